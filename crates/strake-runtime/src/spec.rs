//! CRI `ContainerConfig` -> OCI runtime spec (`config.json`).
//!
//! [`build_spec`] is a pure function of a [`SpecInput`]: the CRI container and sandbox configs, the
//! image's process defaults ([`ImageProcessConfig`]), facts about the sandbox ([`SandboxFacts`]),
//! the rootfs path and the cgroup driver, plus [`Resolved`] facts that need files to find out (the
//! user and groups from the rootfs's `/etc/passwd` and `/etc/group`, device numbers, a Localhost
//! seccomp profile, whether a mount's host side can propagate). [`Resolved::resolve`] (with the
//! small readers it calls) is the only code here that reads files. [`stop_signal`] picks the
//! signal StopContainer sends.
//!
//! The rules follow containerd's CRI plugin (the runtime upstream's node tests are written against),
//! each noted where it is applied:
//! - command: CRI `command` replaces the image entrypoint *and* cmd; CRI `args` alone replace the
//!   image cmd and keep its entrypoint;
//! - env: `PATH` default, `HOSTNAME`, image env, then CRI envs, a later key replacing an earlier one
//!   in place;
//! - mounts: the runtime's defaults, minus any the CRI mounts shadow (all of `/dev/*` when `/dev`
//!   itself is mounted), then CRI mounts and the sandbox's `/etc/hosts`, `/etc/resolv.conf`,
//!   `/etc/hostname` and `/dev/shm` (a CRI mount of the same path wins), ordered parents first;
//! - capabilities: containerd's default set; `ALL` and privileged mean the daemon's own bounding
//!   set; privileged also means host devices, no masked/read-only paths, no seccomp, rw `/sys`;
//! - seccomp `RuntimeDefault` is [`default_seccomp_profile`], a deny-list (see there); nothing
//!   asked means Unconfined.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxCapabilities, LinuxCpu, LinuxDevice, LinuxDeviceCgroup,
    LinuxDeviceType, LinuxHugepageLimit, LinuxMemory, LinuxNamespace, LinuxNamespaceType,
    LinuxResources, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    LinuxSyscall, Mount, PosixRlimit, Process, Root, Spec, User,
};
use strake_types::cri;

use crate::cgroups::{CgroupDriver, cgroups_path};

/// The `PATH` a container gets unless its image sets one (containerd's and Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Annotation keys containerd's CRI plugin sets; tools (and runtimes like kata) read them.
pub mod annotations {
    /// `container` for app containers, `sandbox` for the pause container.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// The pod sandbox's ID.
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    /// The pod's name.
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    /// The pod's namespace.
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    /// The pod's UID.
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    /// The container's name in the pod.
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    /// The image reference the container was created from.
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// Why a container's spec could not be built. All but the `Read*`/`Load*`/`Stat*` variants mean
/// the CRI request itself is unusable (gRPC `InvalidArgument`).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the CRI config nor the image gives a command.
    #[error("no command specified: neither the container config nor the image has one")]
    NoCommand,
    /// A mount's container path is not absolute or its host path is empty.
    #[error("invalid mount {container_path:?} <- {host_path:?}")]
    InvalidMount {
        container_path: String,
        host_path: String,
    },
    /// A mount kind this runtime does not support yet.
    #[error("unsupported mount at {container_path:?}: {what}")]
    UnsupportedMount {
        container_path: String,
        what: &'static str,
    },
    /// An unknown capability name in add/drop.
    #[error("unknown capability {name:?}")]
    UnknownCapability { name: String },
    /// A privileged container in a sandbox that is not privileged.
    #[error("privileged container in a non-privileged sandbox")]
    PrivilegedNotAllowed,
    /// A namespace to join was not given by the sandbox.
    #[error("the sandbox has no {namespace} namespace to join")]
    MissingSandboxNamespace { namespace: &'static str },
    /// PID namespace mode POD, but the sandbox holds no PID namespace to share.
    #[error(
        "pid namespace mode POD (shareProcessNamespace: true) is not supported: the sandbox has \
         no PID namespace for its containers to share"
    )]
    SharedPidNamespaceUnsupported,
    /// PID namespace mode TARGET without the target's namespace path.
    #[error("pid namespace target {target_id:?} is not known")]
    MissingTargetNamespace { target_id: String },
    /// User namespaces for pods are not supported yet.
    #[error("user namespaces are not supported")]
    UserNamespaceUnsupported,
    /// A user or group ID outside 0..=u32::MAX.
    #[error("{what} {value} is out of range")]
    IdOutOfRange { what: &'static str, value: i64 },
    /// A user name not in the rootfs's `/etc/passwd`.
    /// CRI: `run_as_group` only with `run_as_user` or `run_as_username`; else the runtime must
    /// fail.
    #[error("run_as_group {gid} is given without run_as_user or run_as_username")]
    GroupWithoutUser { gid: i64 },
    #[error("user {name:?} not found in the image's /etc/passwd")]
    UnknownUser { name: String },
    /// A group name not in the rootfs's `/etc/group`.
    #[error("group {name:?} not found in the image's /etc/group")]
    UnknownGroup { name: String },
    /// A Localhost seccomp profile whose path is not absolute.
    #[error("seccomp localhost profile path {path:?} is not absolute")]
    InvalidSeccompPath { path: String },
    /// A Localhost seccomp profile is selected but was not loaded into [`Resolved`].
    #[error("seccomp localhost profile {path:?} was not loaded")]
    SeccompProfileNotLoaded { path: String },
    /// The rootfs's `/etc/passwd` or `/etc/group` could not be read.
    #[error("read {path}")]
    ReadUserDatabase {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A Localhost seccomp profile could not be read or parsed.
    #[error("load seccomp profile {path}")]
    LoadSeccompProfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("read {path}")]
    ReadMountinfo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A mount asks for propagation its host mount cannot give (as containerd checks).
    #[error("mount {host_path:?} is on {mount_point:?}, which is not a {needed} mount")]
    MountNotShared {
        host_path: String,
        mount_point: String,
        needed: &'static str,
    },
    /// A device's host path could not be inspected.
    #[error("stat device {path}")]
    StatDevice {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A device's host path is not a character or block device (or a directory of them).
    #[error("{path} is not a device")]
    NotADevice { path: PathBuf },
}

/// What an image's config says about the process (`config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`,
/// `User`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcessConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value` each.
    pub env: Vec<String>,
    /// `WorkingDir`; empty means `/`.
    pub working_dir: String,
    /// `User`: empty, `uid`, `uid:gid`, `name`, `name:group`, ...
    pub user: String,
    /// `StopSignal` (`SIGTERM`, `TERM`, `15`, `SIGRTMIN+3`); empty means SIGTERM.
    pub stop_signal: String,
}

impl From<&oci_spec::image::Config> for ImageProcessConfig {
    fn from(config: &oci_spec::image::Config) -> Self {
        ImageProcessConfig {
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            env: config.env().clone().unwrap_or_default(),
            working_dir: config.working_dir().clone().unwrap_or_default(),
            user: config.user().clone().unwrap_or_default(),
            stop_signal: config.stop_signal().clone().unwrap_or_default(),
        }
    }
}

/// Namespaces of the pod sandbox that its containers join, as paths (`/proc/<pause>/ns/ipc` or a
/// bind-mounted pin). `None` where the sandbox has none (host network, host IPC, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxNamespaces {
    /// The pod's network namespace.
    pub network: Option<PathBuf>,
    /// The pod's IPC namespace.
    pub ipc: Option<PathBuf>,
    /// The pod's UTS namespace.
    pub uts: Option<PathBuf>,
    /// The pod's PID namespace (used when the container's PID mode is POD).
    pub pid: Option<PathBuf>,
}

impl SandboxNamespaces {
    /// The namespaces of a running pause process, all through `/proc/<pid>/ns/`.
    pub fn of_process(pid: u32) -> Self {
        let ns = |name: &str| Some(PathBuf::from(format!("/proc/{pid}/ns/{name}")));
        SandboxNamespaces {
            network: ns("net"),
            ipc: ns("ipc"),
            uts: ns("uts"),
            pid: ns("pid"),
        }
    }
}

/// What the sandbox made for its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFacts {
    /// The sandbox's ID.
    pub id: String,
    /// The pod's hostname (the `HOSTNAME` env var).
    pub hostname: String,
    /// The namespaces to join.
    pub namespaces: SandboxNamespaces,
    /// The sandbox's generated `/etc/hosts`, if any.
    pub hosts_path: Option<PathBuf>,
    /// The sandbox's generated `/etc/resolv.conf`, if any.
    pub resolv_conf_path: Option<PathBuf>,
    /// The sandbox's generated `/etc/hostname`, if any.
    pub hostname_path: Option<PathBuf>,
    /// The sandbox's `/dev/shm` (a tmpfs shared by its containers), if any.
    pub shm_path: Option<PathBuf>,
}

/// The process identity: what `process.user` becomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Primary GID first, then `/etc/group` memberships, then CRI supplemental groups.
    pub additional_gids: Vec<u32>,
}

/// A CRI device with its numbers looked up on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDevice {
    /// The device node to create in the container.
    pub device: LinuxDevice,
    /// cgroup access (`rwm` or a subset).
    pub access: String,
}

/// Facts for [`build_spec`] that need files to find out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// The user and groups.
    pub user: ResolvedUser,
    /// The CRI devices.
    pub devices: Vec<ResolvedDevice>,
    /// Every device on the host, for privileged containers (empty otherwise).
    pub host_devices: Vec<LinuxDevice>,
    /// A Localhost seccomp profile, loaded from `localhost_path`.
    pub localhost_seccomp: Option<LinuxSeccomp>,
}

impl Resolved {
    /// Reads what [`build_spec`] needs from the rootfs and the host: users and groups from the
    /// rootfs (never following a symlink out of it), device numbers, and a Localhost seccomp
    /// profile.
    pub fn resolve(
        config: &cri::ContainerConfig,
        image: &ImageProcessConfig,
        rootfs: &Path,
    ) -> Result<Self, SpecError> {
        let sc = security_context(config);
        let db = UserDb::read_from_rootfs(rootfs)?;
        let user = resolve_user(sc, &image.user, &db)?;
        let devices = resolve_devices(&config.devices)?;
        let host_devices = if sc.is_some_and(|sc| sc.privileged) {
            host_devices()?
        } else {
            Vec::new()
        };
        let localhost_seccomp = match seccomp_choice(sc)? {
            SeccompChoice::Localhost(path) => Some(load_seccomp_profile(Path::new(&path))?),
            _ => None,
        };
        if config
            .mounts
            .iter()
            .any(|m| m.propagation != cri::MountPropagation::PropagationPrivate as i32)
        {
            let path = PathBuf::from("/proc/self/mountinfo");
            let mountinfo = std::fs::read_to_string(&path)
                .map_err(|source| SpecError::ReadMountinfo { path, source })?;
            check_mount_propagation(&config.mounts, &mountinfo, |p| {
                std::fs::canonicalize(p).ok()
            })?;
        }
        Ok(Resolved {
            user,
            devices,
            host_devices,
            localhost_seccomp,
        })
    }
}

/// Node-wide settings that shape every container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// Give containers their own cgroup namespace (what containerd does on cgroup v2 hosts).
    pub cgroup_namespace: bool,
    /// Whether AppArmor is enabled on the host; Localhost profiles are ignored otherwise.
    pub apparmor_enabled: bool,
    /// `process.rlimits`; empty = inherit the runtime's.
    pub rlimits: Vec<PosixRlimit>,
    /// What `ALL` and privileged grant: the daemon's own bounding set
    /// ([`current_bounding_capabilities`]), since a runtime cannot grant more; `None` means
    /// [`all_capabilities`].
    pub bounding_capabilities: Option<Capabilities>,
    /// The huge page sizes (`2MB`, `1GB`) a container's cgroup can limit
    /// ([`crate::cgroups::CgroupLayout::hugetlb_page_sizes`]): a CRI limit of any other size,
    /// or any limit at all without a hugetlb controller, is left out of the spec, as containerd
    /// leaves it out. (The kubelet sends a limit for every size the kernel offers, even where
    /// no hugetlb controller exists, and runc fails the container it cannot set one for.)
    pub hugepage_sizes: BTreeSet<String>,
}

/// Everything a container's spec is made from.
#[derive(Debug, Clone, Copy)]
pub struct SpecInput<'a> {
    /// The container's ID.
    pub container_id: &'a str,
    /// CreateContainer's config.
    pub config: &'a cri::ContainerConfig,
    /// The pod's sandbox config.
    pub sandbox_config: &'a cri::PodSandboxConfig,
    /// What the sandbox made.
    pub sandbox: &'a SandboxFacts,
    /// The image's process defaults.
    pub image: &'a ImageProcessConfig,
    /// The image reference, for the annotation.
    pub image_name: &'a str,
    /// The prepared rootfs (absolute path).
    pub rootfs: &'a Path,
    /// The node's cgroup driver.
    pub cgroup_driver: CgroupDriver,
    /// The PID namespace of the target container (NamespaceMode TARGET).
    pub target_pid_namespace: Option<&'a Path>,
    /// Facts read from files.
    pub resolved: &'a Resolved,
    /// Node-wide settings.
    pub node: &'a NodeOptions,
    /// This is the pod's infra container: annotated `container-type: sandbox`, which runtimes
    /// that run a pod's containers in one sandbox (gVisor) start that sandbox with.
    pub infra: bool,
}

fn security_context(config: &cri::ContainerConfig) -> Option<&cri::LinuxContainerSecurityContext> {
    config.linux.as_ref()?.security_context.as_ref()
}

/// Builds the OCI runtime spec of a container.
pub fn build_spec(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let config = input.config;
    let default_sc = cri::LinuxContainerSecurityContext::default();
    let sc = security_context(config).unwrap_or(&default_sc);
    let privileged = sc.privileged;
    if privileged
        && !input
            .sandbox_config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .is_some_and(|s| s.privileged)
    {
        return Err(SpecError::PrivilegedNotAllowed);
    }
    let default_ns = cri::NamespaceOption::default();
    let ns = sc.namespace_options.as_ref().unwrap_or(&default_ns);

    let capabilities = capabilities(sc, input.node)?;
    let mut process = Process::default();
    process
        .set_terminal(Some(config.tty))
        .set_args(Some(process_args(config, input.image)?))
        .set_env(Some(process_env(
            config,
            input.image,
            &input.sandbox.hostname,
        )))
        .set_cwd(PathBuf::from(working_dir(config, input.image)))
        .set_user(user(&input.resolved.user))
        .set_capabilities(Some(capabilities.clone()))
        .set_no_new_privileges(Some(sc.no_new_privs))
        .set_rlimits((!input.node.rlimits.is_empty()).then(|| input.node.rlimits.clone()))
        .set_apparmor_profile(apparmor_profile(
            sc,
            input.node.apparmor_enabled,
            privileged,
        ))
        .set_oom_score_adj(
            linux_resources(config).map(|r| r.oom_score_adj.clamp(-1000, 1000) as i32),
        );

    let mut root = Root::default();
    root.set_path(input.rootfs.to_path_buf())
        .set_readonly(Some(sc.readonly_rootfs));

    let (mounts, rootfs_propagation) = mounts(config, input.sandbox, sc, ns)?;

    let mut linux = oci_spec::runtime::Linux::default();
    linux
        .set_namespaces(Some(namespaces(ns, input, input.node.cgroup_namespace)?))
        .set_resources(Some(resources(
            config,
            input.resolved,
            privileged,
            &input.node.hugepage_sizes,
        )))
        .set_cgroups_path(Some(PathBuf::from(cgroups_path(
            input.cgroup_driver,
            input
                .sandbox_config
                .linux
                .as_ref()
                .map(|l| l.cgroup_parent.as_str())
                .unwrap_or_default(),
            input.container_id,
        ))))
        .set_devices(Some(devices(input.resolved, privileged)))
        .set_sysctl(
            input
                .sandbox_config
                .linux
                .as_ref()
                .filter(|l| !l.sysctls.is_empty())
                .map(|l| l.sysctls.clone()),
        )
        .set_rootfs_propagation(rootfs_propagation)
        .set_masked_paths(Some(if privileged {
            Vec::new()
        } else if sc.masked_paths.is_empty() {
            default_masked_paths()
        } else {
            sc.masked_paths.clone()
        }))
        .set_readonly_paths(Some(if privileged {
            Vec::new()
        } else if sc.readonly_paths.is_empty() {
            default_readonly_paths()
        } else {
            sc.readonly_paths.clone()
        }))
        .set_seccomp(if privileged {
            None
        } else {
            match seccomp_choice(Some(sc))? {
                SeccompChoice::Unconfined => None,
                SeccompChoice::RuntimeDefault => Some(default_seccomp_profile(
                    capabilities
                        .bounding()
                        .as_ref()
                        .unwrap_or(&Capabilities::new()),
                )),
                SeccompChoice::Localhost(path) => Some(
                    input
                        .resolved
                        .localhost_seccomp
                        .clone()
                        .ok_or(SpecError::SeccompProfileNotLoaded { path })?,
                ),
            }
        });

    let mut spec = Spec::default();
    spec.set_version("1.0.2-dev".to_string())
        .set_hostname(None)
        .set_root(Some(root))
        .set_process(Some(process))
        .set_mounts(Some(mounts))
        .set_annotations(Some(spec_annotations(input)))
        .set_linux(Some(linux));
    Ok(spec)
}

fn linux_resources(config: &cri::ContainerConfig) -> Option<&cri::LinuxContainerResources> {
    config.linux.as_ref()?.resources.as_ref()
}

/// containerd's rule (from Docker): a CRI command replaces entrypoint and cmd; CRI args alone
/// replace cmd; an image entrypoint of `[""]` means none.
fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageProcessConfig,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        if !(image.entrypoint.len() == 1 && image.entrypoint[0].is_empty()) {
            command = image.entrypoint.clone();
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(command)
}

fn process_env(
    config: &cri::ContainerConfig,
    image: &ImageProcessConfig,
    hostname: &str,
) -> Vec<String> {
    let mut env: Vec<String> = vec![format!("PATH={DEFAULT_PATH}")];
    let mut set = |entry: String| {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    };
    if !hostname.is_empty() {
        set(format!("HOSTNAME={hostname}"));
    }
    for entry in &image.env {
        set(entry.clone());
    }
    for kv in &config.envs {
        set(format!("{}={}", kv.key, String::from_utf8_lossy(&kv.value)));
    }
    env
}

fn working_dir(config: &cri::ContainerConfig, image: &ImageProcessConfig) -> String {
    [config.working_dir.as_str(), image.working_dir.as_str()]
        .into_iter()
        .find(|w| !w.is_empty())
        .unwrap_or("/")
        .to_string()
}

fn user(resolved: &ResolvedUser) -> User {
    let mut user = User::default();
    user.set_uid(resolved.uid)
        .set_gid(resolved.gid)
        .set_additional_gids(Some(resolved.additional_gids.clone()));
    user
}

fn apparmor_profile(
    sc: &cri::LinuxContainerSecurityContext,
    enabled: bool,
    privileged: bool,
) -> Option<String> {
    if !enabled || privileged {
        return None;
    }
    match &sc.apparmor {
        Some(p) if p.profile_type == cri::security_profile::ProfileType::Localhost as i32 => {
            Some(p.localhost_ref.clone())
        }
        Some(_) => None,
        #[allow(deprecated)]
        None => sc
            .apparmor_profile
            .strip_prefix("localhost/")
            .map(str::to_string),
    }
}

fn spec_annotations(input: &SpecInput<'_>) -> HashMap<String, String> {
    let pod = input.sandbox_config.metadata.clone().unwrap_or_default();
    let name = input
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    HashMap::from([
        (
            annotations::CONTAINER_TYPE.into(),
            if input.infra { "sandbox" } else { "container" }.into(),
        ),
        (annotations::SANDBOX_ID.into(), input.sandbox.id.clone()),
        (annotations::SANDBOX_NAME.into(), pod.name),
        (annotations::SANDBOX_NAMESPACE.into(), pod.namespace),
        (annotations::SANDBOX_UID.into(), pod.uid),
        (annotations::CONTAINER_NAME.into(), name),
        (annotations::IMAGE_NAME.into(), input.image_name.to_string()),
    ])
}

// ---------------------------------------------------------------------------------------------
// Mounts

fn oci_mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(destination))
        .set_typ(Some(typ.to_string()))
        .set_source(Some(PathBuf::from(source)))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// containerd's default mounts for CRI containers (its default spec without `/run`, plus a
/// read-only cgroup filesystem); privileged containers get `/sys` and the cgroupfs read-write.
pub fn default_mounts(privileged: bool) -> Vec<Mount> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    vec![
        oci_mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        oci_mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        oci_mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        oci_mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        oci_mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        oci_mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        ),
        oci_mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        ),
    ]
}

fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

type MountsAndPropagation = (Vec<Mount>, Option<String>);

fn mounts(
    config: &cri::ContainerConfig,
    sandbox: &SandboxFacts,
    sc: &cri::LinuxContainerSecurityContext,
    ns: &cri::NamespaceOption,
) -> Result<MountsAndPropagation, SpecError> {
    use cri::MountPropagation as P;

    let readonly_files = sc.readonly_rootfs;
    let mut extra: Vec<cri::Mount> = Vec::new();
    let mut add_extra = |container_path: &str, host: &Option<PathBuf>, readonly: bool| {
        if let Some(host) = host {
            extra.push(cri::Mount {
                container_path: container_path.to_string(),
                host_path: host.to_string_lossy().into_owned(),
                readonly,
                ..Default::default()
            });
        }
    };
    add_extra("/etc/hostname", &sandbox.hostname_path, readonly_files);
    add_extra("/etc/hosts", &sandbox.hosts_path, readonly_files);
    add_extra(
        "/etc/resolv.conf",
        &sandbox.resolv_conf_path,
        readonly_files,
    );
    if ns.ipc == cri::NamespaceMode::Node as i32 {
        add_extra("/dev/shm", &Some(PathBuf::from("/dev/shm")), false);
    } else {
        add_extra("/dev/shm", &sandbox.shm_path, false);
    }

    // CRI mounts win over the sandbox's files at the same path.
    let mut requested: Vec<&cri::Mount> = config.mounts.iter().collect();
    for e in &extra {
        if !config
            .mounts
            .iter()
            .any(|c| clean_path(&c.container_path) == clean_path(&e.container_path))
        {
            requested.push(e);
        }
    }
    // Parents before children, so a mount never hides a deeper one.
    requested.sort_by_key(|m| {
        clean_path(&m.container_path)
            .split('/')
            .filter(|p| !p.is_empty())
            .count()
    });

    let destinations: HashSet<String> = requested
        .iter()
        .map(|m| clean_path(&m.container_path))
        .collect();
    let dev_mounted = destinations.contains("/dev");
    let mut out: Vec<Mount> = default_mounts(sc.privileged)
        .into_iter()
        .filter(|m| {
            let dst = m.destination().to_string_lossy().into_owned();
            !(destinations.contains(&dst) || (dev_mounted && dst.starts_with("/dev/")))
        })
        .collect();

    let mut propagation: Option<String> = None;
    for m in requested {
        if !m.container_path.starts_with('/') || m.host_path.is_empty() {
            return Err(SpecError::InvalidMount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
            });
        }
        if m.image.is_some() {
            return Err(SpecError::UnsupportedMount {
                container_path: m.container_path.clone(),
                what: "image volume",
            });
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(SpecError::UnsupportedMount {
                container_path: m.container_path.clone(),
                what: "id-mapped mount",
            });
        }
        let mut options = vec!["rbind".to_string()];
        match P::try_from(m.propagation).unwrap_or(P::PropagationPrivate) {
            P::PropagationPrivate => options.push("rprivate".into()),
            P::PropagationHostToContainer => {
                options.push("rslave".into());
                if propagation.as_deref() != Some("rshared") {
                    propagation = Some("rslave".into());
                }
            }
            P::PropagationBidirectional => {
                options.push("rshared".into());
                propagation = Some("rshared".into());
            }
        }
        options.push(if m.readonly { "ro" } else { "rw" }.into());
        let mut mount = Mount::default();
        mount
            .set_destination(PathBuf::from(&m.container_path))
            .set_typ(Some("bind".into()))
            .set_source(Some(PathBuf::from(&m.host_path)))
            .set_options(Some(options));
        out.push(mount);
    }
    Ok((out, propagation))
}

/// Checks, as containerd does, that a Bidirectional mount's host path lives on a shared mount and
/// a HostToContainer one on a shared or slave mount; otherwise the propagation asked for would
/// silently not happen. `canonical` resolves symlinks (`None`: the path is missing, and the OCI
/// runtime will say so).
pub fn check_mount_propagation(
    mounts: &[cri::Mount],
    mountinfo: &str,
    canonical: impl Fn(&Path) -> Option<PathBuf>,
) -> Result<(), SpecError> {
    use cri::MountPropagation as P;
    for m in mounts {
        let needed = match P::try_from(m.propagation) {
            Ok(P::PropagationBidirectional) => "shared",
            Ok(P::PropagationHostToContainer) => "shared or slave",
            _ => continue,
        };
        let Some(host) = canonical(Path::new(&m.host_path)) else {
            continue;
        };
        // The mount holding the path: the longest mount point above it, the last one mounted.
        let mut best: Option<(PathBuf, bool, bool)> = None;
        for line in mountinfo.lines() {
            let Some((left, _)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let Some(point) = fields.get(4) else {
                continue;
            };
            let point = PathBuf::from(point.replace("\\040", " "));
            if !host.starts_with(&point) {
                continue;
            }
            if best
                .as_ref()
                .is_some_and(|(b, _, _)| b.components().count() > point.components().count())
            {
                continue;
            }
            let optional = fields.get(6..).unwrap_or_default();
            let shared = optional.iter().any(|f| f.starts_with("shared:"));
            let slave = optional.iter().any(|f| f.starts_with("master:"));
            best = Some((point, shared, slave));
        }
        let Some((point, shared, slave)) = best else {
            continue;
        };
        let ok = if needed == "shared" {
            shared
        } else {
            shared || slave
        };
        if !ok {
            return Err(SpecError::MountNotShared {
                host_path: m.host_path.clone(),
                mount_point: point.to_string_lossy().into_owned(),
                needed,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Namespaces

fn namespace(typ: LinuxNamespaceType, path: Option<&Path>) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(typ).set_path(path.map(Path::to_path_buf));
    ns
}

fn namespaces(
    opts: &cri::NamespaceOption,
    input: &SpecInput<'_>,
    cgroup_namespace: bool,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    use cri::NamespaceMode as M;
    let mode = |m: i32| M::try_from(m).unwrap_or(M::Pod);
    let pod = &input.sandbox.namespaces;
    fn join<'p>(path: &'p Option<PathBuf>, name: &'static str) -> Result<&'p Path, SpecError> {
        path.as_deref()
            .ok_or(SpecError::MissingSandboxNamespace { namespace: name })
    }
    if let Some(userns) = &opts.userns_options
        && mode(userns.mode) != M::Node
    {
        return Err(SpecError::UserNamespaceUnsupported);
    }

    let mut out = Vec::new();
    match mode(opts.pid) {
        M::Node => {}
        M::Container => out.push(namespace(LinuxNamespaceType::Pid, None)),
        M::Pod => out.push(namespace(
            LinuxNamespaceType::Pid,
            Some(
                pod.pid
                    .as_deref()
                    .ok_or(SpecError::SharedPidNamespaceUnsupported)?,
            ),
        )),
        M::Target => {
            out.push(namespace(
                LinuxNamespaceType::Pid,
                Some(input.target_pid_namespace.ok_or_else(|| {
                    SpecError::MissingTargetNamespace {
                        target_id: opts.target_id.clone(),
                    }
                })?),
            ))
        }
    }
    match mode(opts.ipc) {
        M::Node => {}
        M::Container => out.push(namespace(LinuxNamespaceType::Ipc, None)),
        M::Pod | M::Target => out.push(namespace(
            LinuxNamespaceType::Ipc,
            Some(join(&pod.ipc, "ipc")?),
        )),
    }
    // Host-network pods keep the host's UTS namespace too (their hostname is the node's).
    if mode(opts.network) != M::Node {
        out.push(namespace(
            LinuxNamespaceType::Uts,
            Some(join(&pod.uts, "uts")?),
        ));
    }
    out.push(namespace(LinuxNamespaceType::Mount, None));
    if mode(opts.network) != M::Node {
        out.push(namespace(
            LinuxNamespaceType::Network,
            Some(join(&pod.network, "network")?),
        ));
    }
    if cgroup_namespace {
        out.push(namespace(LinuxNamespaceType::Cgroup, None));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Capabilities

/// containerd's default capability set.
pub fn default_capabilities() -> Capabilities {
    use Capability as C;
    [
        C::Chown,
        C::DacOverride,
        C::Fsetid,
        C::Fowner,
        C::Mknod,
        C::NetRaw,
        C::Setgid,
        C::Setuid,
        C::Setfcap,
        C::Setpcap,
        C::NetBindService,
        C::SysChroot,
        C::Kill,
        C::AuditWrite,
    ]
    .into_iter()
    .collect()
}

/// Linux capabilities by number (`CAP_CHOWN` = 0 ... `CAP_CHECKPOINT_RESTORE` = 40).
pub const CAPABILITIES_BY_NUMBER: [Capability; 41] = {
    use Capability as C;
    [
        C::Chown,
        C::DacOverride,
        C::DacReadSearch,
        C::Fowner,
        C::Fsetid,
        C::Kill,
        C::Setgid,
        C::Setuid,
        C::Setpcap,
        C::LinuxImmutable,
        C::NetBindService,
        C::NetBroadcast,
        C::NetAdmin,
        C::NetRaw,
        C::IpcLock,
        C::IpcOwner,
        C::SysModule,
        C::SysRawio,
        C::SysChroot,
        C::SysPtrace,
        C::SysPacct,
        C::SysAdmin,
        C::SysBoot,
        C::SysNice,
        C::SysResource,
        C::SysTime,
        C::SysTtyConfig,
        C::Mknod,
        C::Lease,
        C::AuditWrite,
        C::AuditControl,
        C::Setfcap,
        C::MacOverride,
        C::MacAdmin,
        C::Syslog,
        C::WakeAlarm,
        C::BlockSuspend,
        C::AuditRead,
        C::Perfmon,
        C::Bpf,
        C::CheckpointRestore,
    ]
};

/// Every capability this crate knows.
pub fn all_capabilities() -> Capabilities {
    CAPABILITIES_BY_NUMBER.into_iter().collect()
}

/// The capabilities in a kernel bit mask (as in `/proc/<pid>/status`).
pub fn capabilities_from_mask(mask: u64) -> Capabilities {
    CAPABILITIES_BY_NUMBER
        .into_iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, c)| c)
        .collect()
}

/// This process's bounding set: all a container it starts can get (containerd's
/// `WithAllCurrentCapabilities`). `None` if `/proc/self/status` cannot say.
pub fn current_bounding_capabilities() -> Option<Capabilities> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16)
        .ok()
        .map(capabilities_from_mask)
}

/// Parses a CRI capability name (`NET_ADMIN`, `CAP_NET_ADMIN`, any case).
pub fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        SpecError::UnknownCapability {
            name: name.to_string(),
        }
    })
}

/// containerd's order: add ALL, drop ALL, then individual adds, then individual drops; privileged
/// means every capability whatever was dropped.
fn capabilities(
    sc: &cri::LinuxContainerSecurityContext,
    node: &NodeOptions,
) -> Result<LinuxCapabilities, SpecError> {
    let all = || {
        node.bounding_capabilities
            .clone()
            .unwrap_or_else(all_capabilities)
    };
    let mut set = default_capabilities();
    let mut ambient = Capabilities::new();
    if sc.privileged {
        set = all();
    } else if let Some(caps) = &sc.capabilities {
        let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
        if caps.add_capabilities.iter().any(is_all) {
            set = all();
        }
        if caps.drop_capabilities.iter().any(is_all) {
            set.clear();
        }
        for c in caps.add_capabilities.iter().filter(|c| !is_all(c)) {
            set.insert(parse_capability(c)?);
        }
        for c in caps.drop_capabilities.iter().filter(|c| !is_all(c)) {
            set.remove(&parse_capability(c)?);
        }
        for c in &caps.add_ambient_capabilities {
            let cap = parse_capability(c)?;
            set.insert(cap);
            ambient.insert(cap);
        }
    }
    let mut out = LinuxCapabilities::default();
    out.set_bounding(Some(set.clone()))
        .set_effective(Some(set.clone()))
        .set_permitted(Some(set))
        .set_inheritable((!ambient.is_empty()).then(|| ambient.clone()))
        .set_ambient((!ambient.is_empty()).then_some(ambient));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Resources and devices

fn resources(
    config: &cri::ContainerConfig,
    resolved: &Resolved,
    privileged: bool,
    hugepage_sizes: &BTreeSet<String>,
) -> LinuxResources {
    let mut out = LinuxResources::default();
    let mut device_rules = Vec::new();
    let mut rule = |allow: bool,
                    typ: Option<LinuxDeviceType>,
                    major: Option<i64>,
                    minor: Option<i64>,
                    access: &str| {
        let mut r = LinuxDeviceCgroup::default();
        r.set_allow(allow)
            .set_typ(typ)
            .set_major(major)
            .set_minor(minor)
            .set_access(Some(access.to_string()));
        device_rules.push(r);
    };
    if privileged {
        rule(true, None, None, None, "rwm");
    } else {
        // Deny all; the runtime itself allows its default devices (null, zero, tty, ...).
        rule(false, None, None, None, "rwm");
        for d in &resolved.devices {
            rule(
                true,
                Some(d.device.typ()),
                Some(d.device.major()),
                Some(d.device.minor()),
                &d.access,
            );
        }
    }
    out.set_devices(Some(device_rules));

    let Some(r) = linux_resources(config) else {
        return out;
    };
    let mut cpu = LinuxCpu::default();
    let mut has_cpu = false;
    // Zero means unset; negative periods and shares are meaningless and treated as unset too
    // (a negative quota is the kernel's "unlimited" and passes through).
    if r.cpu_period > 0 {
        cpu.set_period(Some(r.cpu_period as u64));
        has_cpu = true;
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
        has_cpu = true;
    }
    if r.cpu_shares > 0 {
        cpu.set_shares(Some(r.cpu_shares as u64));
        has_cpu = true;
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
        has_cpu = true;
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
        has_cpu = true;
    }
    if has_cpu {
        out.set_cpu(Some(cpu));
    }
    if r.memory_limit_in_bytes != 0 || r.memory_swap_limit_in_bytes != 0 {
        let mut memory = LinuxMemory::default();
        if r.memory_limit_in_bytes != 0 {
            memory.set_limit(Some(r.memory_limit_in_bytes));
            // Swap equal to the limit: no swapping unless asked for.
            memory.set_swap(Some(r.memory_limit_in_bytes));
        }
        if r.memory_swap_limit_in_bytes != 0 {
            memory.set_swap(Some(r.memory_swap_limit_in_bytes));
        }
        out.set_memory(Some(memory));
    }
    let hugepage_limits: Vec<LinuxHugepageLimit> = r
        .hugepage_limits
        .iter()
        .filter(|h| hugepage_sizes.contains(&h.page_size))
        .map(|h| {
            let mut l = LinuxHugepageLimit::default();
            l.set_page_size(h.page_size.clone())
                .set_limit(h.limit.min(i64::MAX as u64) as i64);
            l
        })
        .collect();
    if !hugepage_limits.is_empty() {
        out.set_hugepage_limits(Some(hugepage_limits));
    }
    if !r.unified.is_empty() {
        out.set_unified(Some(r.unified.clone()));
    }
    out
}

fn devices(resolved: &Resolved, privileged: bool) -> Vec<LinuxDevice> {
    let mut out: Vec<LinuxDevice> = if privileged {
        resolved.host_devices.clone()
    } else {
        Vec::new()
    };
    for d in &resolved.devices {
        if !out.iter().any(|o| o.path() == d.device.path()) {
            out.push(d.device.clone());
        }
    }
    out
}

/// Looks up the CRI devices on the host: a device node maps to itself, a directory to the device
/// nodes directly in it.
pub fn resolve_devices(devices: &[cri::Device]) -> Result<Vec<ResolvedDevice>, SpecError> {
    let mut out = Vec::new();
    for d in devices {
        let host = PathBuf::from(&d.host_path);
        let access = if d.permissions.is_empty() {
            "rwm".to_string()
        } else {
            d.permissions.clone()
        };
        let meta = std::fs::metadata(&host).map_err(|source| SpecError::StatDevice {
            path: host.clone(),
            source,
        })?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&host).map_err(|source| SpecError::StatDevice {
                path: host.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let path = entry.path();
                if let Ok(Some(mut device)) = device_from_path(&path) {
                    device.set_path(Path::new(&d.container_path).join(entry.file_name()));
                    out.push(ResolvedDevice {
                        device,
                        access: access.clone(),
                    });
                }
            }
        } else {
            let mut device =
                device_from_path(&host)?.ok_or(SpecError::NotADevice { path: host.clone() })?;
            device.set_path(PathBuf::from(&d.container_path));
            out.push(ResolvedDevice { device, access });
        }
    }
    Ok(out)
}

/// A device node's type, numbers, mode and owner; `None` if the path is not a device.
fn device_from_path(path: &Path) -> Result<Option<LinuxDevice>, SpecError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(path).map_err(|source| SpecError::StatDevice {
        path: path.to_path_buf(),
        source,
    })?;
    let typ = if meta.file_type().is_char_device() {
        LinuxDeviceType::C
    } else if meta.file_type().is_block_device() {
        LinuxDeviceType::B
    } else {
        return Ok(None);
    };
    let rdev = meta.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let mut device = LinuxDevice::default();
    device
        .set_path(path.to_path_buf())
        .set_typ(typ)
        .set_major(major as i64)
        .set_minor(minor as i64)
        .set_file_mode(Some(meta.mode() & 0o777))
        .set_uid(Some(meta.uid()))
        .set_gid(Some(meta.gid()));
    Ok(Some(device))
}

/// Every device node under the host's `/dev`, for privileged containers (what containerd's
/// `WithHostDevices` does), skipping the per-container filesystems runc mounts itself.
pub fn host_devices() -> Result<Vec<LinuxDevice>, SpecError> {
    fn walk(dir: &Path, out: &mut Vec<LinuxDevice>) {
        const SKIP: &[&str] = &[
            "pts",
            "shm",
            "fd",
            "mqueue",
            ".lxc",
            ".lxd-mounts",
            "console",
        ];
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if SKIP.iter().any(|s| name == *s) {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => walk(&path, out),
                Ok(_) => {
                    if let Ok(Some(device)) = device_from_path(&path) {
                        out.push(device);
                    }
                }
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/dev"), &mut out);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Masked and read-only paths

/// containerd's default masked paths.
pub fn default_masked_paths() -> Vec<String> {
    [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
        "/proc/scsi",
    ]
    .map(String::from)
    .to_vec()
}

/// containerd's default read-only paths.
pub fn default_readonly_paths() -> Vec<String> {
    [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    .map(String::from)
    .to_vec()
}

// ---------------------------------------------------------------------------------------------
// Seccomp

/// Which seccomp profile a container asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeccompChoice {
    /// No filter.
    Unconfined,
    /// [`default_seccomp_profile`].
    RuntimeDefault,
    /// An OCI seccomp JSON file at this absolute path.
    Localhost(String),
}

/// The `seccomp` field wins; without it the deprecated `seccomp_profile_path` is read
/// (`runtime/default`, `docker/default`, `unconfined`, `localhost/<path>`); nothing means
/// Unconfined, as in containerd (kubelet sends RuntimeDefault explicitly when it wants it).
pub fn seccomp_choice(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<SeccompChoice, SpecError> {
    use cri::security_profile::ProfileType as T;
    let Some(sc) = sc else {
        return Ok(SeccompChoice::Unconfined);
    };
    let localhost = |path: &str| {
        if path.starts_with('/') {
            Ok(SeccompChoice::Localhost(path.to_string()))
        } else {
            Err(SpecError::InvalidSeccompPath {
                path: path.to_string(),
            })
        }
    };
    if let Some(profile) = &sc.seccomp {
        return match T::try_from(profile.profile_type).unwrap_or(T::Unconfined) {
            T::RuntimeDefault => Ok(SeccompChoice::RuntimeDefault),
            T::Unconfined => Ok(SeccompChoice::Unconfined),
            T::Localhost => localhost(&profile.localhost_ref),
        };
    }
    #[allow(deprecated)]
    let path = sc.seccomp_profile_path.as_str();
    match path {
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        p => match p.strip_prefix("localhost/") {
            Some(rest) => localhost(rest),
            None => Err(SpecError::InvalidSeccompPath {
                path: p.to_string(),
            }),
        },
    }
}

/// Reads an OCI-format seccomp profile (`defaultAction`, `architectures`, `syscalls`).
pub fn load_seccomp_profile(path: &Path) -> Result<LinuxSeccomp, SpecError> {
    let err = |source| SpecError::LoadSeccompProfile {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read(path).map_err(err)?;
    serde_json::from_slice(&text)
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
const CLONE_NEWUSER: u64 = 0x1000_0000;

/// Syscalls refused with EPERM unless the container holds one of the listed capabilities.
const DENIED_SYSCALLS: &[(&[&str], &[Capability])] = &[
    (&["acct"], &[Capability::SysPacct]),
    (&["add_key", "keyctl", "request_key"], &[]),
    (&["bpf"], &[Capability::SysAdmin, Capability::Bpf]),
    (
        &["clock_adjtime", "clock_settime", "settimeofday", "stime"],
        &[Capability::SysTime],
    ),
    (
        &[
            "create_module",
            "delete_module",
            "finit_module",
            "init_module",
            "get_kernel_syms",
            "query_module",
        ],
        &[Capability::SysModule],
    ),
    (
        &["get_mempolicy", "mbind", "set_mempolicy", "move_pages"],
        &[Capability::SysNice],
    ),
    (&["ioperm", "iopl"], &[Capability::SysRawio]),
    (
        &["kcmp", "pidfd_getfd", "process_madvise", "userfaultfd"],
        &[Capability::SysPtrace],
    ),
    (
        &["kexec_file_load", "kexec_load", "reboot"],
        &[Capability::SysBoot],
    ),
    (
        &["perf_event_open"],
        &[Capability::SysAdmin, Capability::Perfmon],
    ),
    (
        &[
            "mount",
            "umount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "move_mount",
            "open_tree",
            "lookup_dcookie",
            "name_to_handle_at",
            "quotactl",
            "swapon",
            "swapoff",
        ],
        &[Capability::SysAdmin],
    ),
    (&["open_by_handle_at"], &[Capability::DacReadSearch]),
    (&["syslog"], &[Capability::Syslog]),
    (
        &[
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "vm86",
            "vm86old",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ],
        &[],
    ),
];

/// The RuntimeDefault seccomp profile: a **deny-list**. Every syscall is allowed except those in
/// a short list of kernel-wide or escape-prone ones (module loading, kexec/reboot, clock setting,
/// mount and namespace syscalls, keyrings, bpf/perf, io_uring, `open_by_handle_at`, obsolete ones),
/// refused with EPERM, each given back when the container holds the capability that guards it
/// (as Docker's profile does). `clone` creating a user namespace is refused, and `clone3` returns
/// ENOSYS so libc falls back to `clone`, unless the container has CAP_SYS_ADMIN.
///
/// A deny-list is smaller to audit and never breaks a program for using a new harmless syscall;
/// what it gives up against Docker's allow-list is coverage of syscalls added after it was written.
pub fn default_seccomp_profile(caps: &Capabilities) -> LinuxSeccomp {
    let mut syscalls = Vec::new();
    let rule = |names: Vec<String>, errno: u32| {
        let mut s = LinuxSyscall::default();
        s.set_names(names)
            .set_action(LinuxSeccompAction::ScmpActErrno)
            .set_errno_ret(Some(errno));
        s
    };
    for (names, unless) in DENIED_SYSCALLS {
        if unless.iter().any(|c| caps.contains(c)) {
            continue;
        }
        syscalls.push(rule(names.iter().map(|n| n.to_string()).collect(), EPERM));
    }
    if !caps.contains(&Capability::SysAdmin) {
        // The flags are argument 0 of clone on every architecture but s390. The builder has a
        // default for every field, so it cannot fail.
        if let Ok(arg) = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(CLONE_NEWUSER)
            .value_two(CLONE_NEWUSER)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
        {
            let mut clone = rule(vec!["clone".into()], EPERM);
            clone.set_args(Some(vec![arg]));
            syscalls.push(clone);
        }
        syscalls.push(rule(vec!["clone3".into()], ENOSYS));
    }
    let mut profile = LinuxSeccomp::default();
    profile
        .set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_architectures(Some(seccomp_architectures()))
        .set_syscalls(Some(syscalls));
    profile
}

fn seccomp_architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        Vec::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Stop signal

/// The signal StopContainer sends first: the CRI config's `stop_signal`, else the image's
/// `StopSignal`, else SIGTERM (an unparsable image value also means SIGTERM).
pub fn stop_signal(config: &cri::ContainerConfig, image: &ImageProcessConfig) -> i32 {
    let from_cri = cri::Signal::try_from(config.stop_signal)
        .ok()
        .filter(|s| *s != cri::Signal::RuntimeDefault)
        .and_then(|s| {
            let name = s.as_str_name().trim_start_matches("SIGNAL_");
            signal_number(&name.replace("PLUS", "+").replace("MINUS", "-"))
        });
    from_cri
        .or_else(|| signal_number(&image.stop_signal))
        .unwrap_or(libc::SIGTERM)
}

/// Parses a signal as Docker does: `SIGTERM`, `TERM`, `sigterm`, `15`, `SIGRTMIN+3`, `RTMAX-1`.
pub fn signal_number(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return (1..=libc::SIGRTMAX()).contains(&n).then_some(n);
    }
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let realtime = |base: i32, rest: &str| -> Option<i32> {
        let n = match rest.chars().next() {
            None => base,
            // Checked: `RTMIN+2147483647` from an image config must not wrap into range.
            Some('+') => base.checked_add(rest[1..].parse::<i32>().ok()?)?,
            Some('-') => base.checked_sub(rest[1..].parse::<i32>().ok()?)?,
            Some(_) => return None,
        };
        (libc::SIGRTMIN()..=libc::SIGRTMAX())
            .contains(&n)
            .then_some(n)
    };
    if let Some(rest) = bare.strip_prefix("RTMIN") {
        return realtime(libc::SIGRTMIN(), rest);
    }
    if let Some(rest) = bare.strip_prefix("RTMAX") {
        return realtime(libc::SIGRTMAX(), rest);
    }
    let n = match bare {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" | "CLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return None,
    };
    Some(n)
}

// ---------------------------------------------------------------------------------------------
// Users and groups

/// A line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
}

/// A line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// GID.
    pub gid: u32,
    /// Member login names.
    pub members: Vec<String>,
}

/// The users and groups of a rootfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserDb {
    /// `/etc/passwd`.
    pub passwd: Vec<PasswdEntry>,
    /// `/etc/group`.
    pub groups: Vec<GroupEntry>,
}

impl UserDb {
    /// Parses `/etc/passwd` and `/etc/group` text, skipping malformed lines.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let fields =
            |line: &str| -> Vec<String> { line.trim().split(':').map(str::to_string).collect() };
        let passwd = passwd
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let f = fields(l);
                Some(PasswdEntry {
                    name: f.first()?.clone(),
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let f = fields(l);
                Some(GroupEntry {
                    name: f.first()?.clone(),
                    gid: f.get(2)?.parse().ok()?,
                    members: f
                        .get(3)
                        .map(|m| {
                            m.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        UserDb { passwd, groups }
    }

    /// Reads `<rootfs>/etc/passwd` and `<rootfs>/etc/group`. A missing file is empty; so is one
    /// reached through a symlink, which could point out of the rootfs.
    pub fn read_from_rootfs(rootfs: &Path) -> Result<Self, SpecError> {
        let read = |name: &str| -> Result<String, SpecError> {
            let etc = rootfs.join("etc");
            let path = etc.join(name);
            for p in [&etc, &path] {
                match std::fs::symlink_metadata(p) {
                    Ok(m) if m.file_type().is_symlink() => return Ok(String::new()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
                    Err(source) => {
                        return Err(SpecError::ReadUserDatabase {
                            path: p.clone(),
                            source,
                        });
                    }
                }
            }
            std::fs::read(&path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|source| SpecError::ReadUserDatabase { path, source })
        };
        Ok(UserDb::parse(&read("passwd")?, &read("group")?))
    }

    fn user_by_name(&self, name: &str) -> Option<&PasswdEntry> {
        self.passwd.iter().find(|p| p.name == name)
    }

    fn user_by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.passwd.iter().find(|p| p.uid == uid)
    }
}

fn id(what: &'static str, value: i64) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| SpecError::IdOutOfRange { what, value })
}

/// Decides the process's UID, GID and groups, as containerd does:
/// 1. `run_as_username`, else `run_as_user`, else the image's `User` (`user[:group]`, each part
///    a number or a name looked up in the rootfs); nothing means root;
/// 2. a UID without a group takes its primary GID from `/etc/passwd` (0 if it has no entry);
/// 3. `run_as_group` overrides the GID (and is an error without `run_as_user` or
///    `run_as_username`, as the CRI requires);
/// 4. groups: the GID, then (unless the supplemental groups policy is Strict) the `/etc/group`
///    groups listing the user as a member, then the CRI supplemental groups, without repeats.
pub fn resolve_user(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image_user: &str,
    db: &UserDb,
) -> Result<ResolvedUser, SpecError> {
    let by_name = |name: &str| -> Result<(u32, u32, Option<String>), SpecError> {
        if let Ok(uid) = name.parse::<u32>() {
            let entry = db.user_by_uid(uid);
            return Ok((
                uid,
                entry.map_or(0, |e| e.gid),
                entry.map(|e| e.name.clone()),
            ));
        }
        let entry = db
            .user_by_name(name)
            .ok_or_else(|| SpecError::UnknownUser {
                name: name.to_string(),
            })?;
        Ok((entry.uid, entry.gid, Some(entry.name.clone())))
    };

    if let Some(sc) = sc
        && let Some(g) = &sc.run_as_group
        && sc.run_as_user.is_none()
        && sc.run_as_username.is_empty()
    {
        return Err(SpecError::GroupWithoutUser { gid: g.value });
    }
    let (mut uid, mut gid, mut name) = (0, 0, db.user_by_uid(0).map(|e| e.name.clone()));
    match sc {
        Some(sc) if !sc.run_as_username.is_empty() => {
            (uid, gid, name) = by_name(&sc.run_as_username)?;
        }
        Some(sc) if sc.run_as_user.is_some() => {
            let value = sc.run_as_user.as_ref().map_or(0, |v| v.value);
            (uid, gid, name) = by_name(&id("run_as_user", value)?.to_string())?;
        }
        _ if !image_user.is_empty() => {
            let (user_part, group_part) = match image_user.split_once(':') {
                Some((u, g)) => (u, Some(g)),
                None => (image_user, None),
            };
            (uid, gid, name) = by_name(user_part)?;
            if let Some(group) = group_part.filter(|g| !g.is_empty()) {
                gid = match group.parse::<u32>() {
                    Ok(g) => g,
                    Err(_) => {
                        db.groups
                            .iter()
                            .find(|g| g.name == group)
                            .ok_or_else(|| SpecError::UnknownGroup {
                                name: group.to_string(),
                            })?
                            .gid
                    }
                };
            }
        }
        _ => {}
    }
    if let Some(g) = sc.and_then(|sc| sc.run_as_group.as_ref()) {
        gid = id("run_as_group", g.value)?;
    }

    let mut gids = vec![gid];
    let mut push = |g: u32| {
        if !gids.contains(&g) {
            gids.push(g);
        }
    };
    let strict = sc.is_some_and(|sc| {
        sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32
    });
    if !strict && let Some(name) = &name {
        for group in db
            .groups
            .iter()
            .filter(|g| g.name != *name && g.members.iter().any(|m| m == name))
        {
            push(group.gid);
        }
    }
    for g in sc
        .map(|sc| sc.supplemental_groups.as_slice())
        .unwrap_or_default()
    {
        push(id("supplemental group", *g)?);
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: gids,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cri::NamespaceMode as M;

    struct Fixture {
        config: cri::ContainerConfig,
        sandbox_config: cri::PodSandboxConfig,
        sandbox: SandboxFacts,
        image: ImageProcessConfig,
        resolved: Resolved,
        node: NodeOptions,
        driver: CgroupDriver,
        target: Option<PathBuf>,
        infra: bool,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                config: cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    linux: Some(cri::LinuxContainerConfig {
                        resources: None,
                        security_context: Some(Default::default()),
                    }),
                    ..Default::default()
                },
                sandbox_config: cri::PodSandboxConfig {
                    metadata: Some(cri::PodSandboxMetadata {
                        name: "pod".into(),
                        uid: "uid-1".into(),
                        namespace: "default".into(),
                        attempt: 0,
                    }),
                    hostname: "pod-host".into(),
                    linux: Some(cri::LinuxPodSandboxConfig {
                        cgroup_parent: "/kubepods/podabc".into(),
                        security_context: Some(Default::default()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                sandbox: SandboxFacts {
                    id: "sb1".into(),
                    hostname: "pod-host".into(),
                    namespaces: SandboxNamespaces::of_process(42),
                    hosts_path: Some("/run/sb1/hosts".into()),
                    resolv_conf_path: Some("/run/sb1/resolv.conf".into()),
                    hostname_path: Some("/run/sb1/hostname".into()),
                    shm_path: Some("/run/sb1/shm".into()),
                },
                image: ImageProcessConfig {
                    entrypoint: vec!["/entry".into()],
                    cmd: vec!["default-cmd".into()],
                    env: vec!["PATH=/img/bin".into(), "IMG=1".into()],
                    working_dir: "/img".into(),
                    user: String::new(),
                    stop_signal: String::new(),
                },
                resolved: Resolved::default(),
                node: NodeOptions::default(),
                driver: CgroupDriver::Cgroupfs,
                target: None,
                infra: false,
            }
        }

        fn sc(&mut self) -> &mut cri::LinuxContainerSecurityContext {
            self.config
                .linux
                .as_mut()
                .and_then(|l| l.security_context.as_mut())
                .expect("fixture has a security context")
        }

        fn ns(&mut self) -> &mut cri::NamespaceOption {
            self.sc()
                .namespace_options
                .get_or_insert_with(Default::default)
        }

        fn try_spec(&self) -> Result<Spec, SpecError> {
            build_spec(&SpecInput {
                container_id: "c1",
                config: &self.config,
                sandbox_config: &self.sandbox_config,
                sandbox: &self.sandbox,
                image: &self.image,
                image_name: "docker.io/library/busybox:latest",
                rootfs: Path::new("/var/lib/strake/c1/rootfs"),
                cgroup_driver: self.driver,
                target_pid_namespace: self.target.as_deref(),
                resolved: &self.resolved,
                node: &self.node,
                infra: self.infra,
            })
        }

        fn spec(&self) -> Spec {
            self.try_spec().expect("spec builds")
        }
    }

    fn process(spec: &Spec) -> &Process {
        spec.process().as_ref().expect("process")
    }

    fn linux(spec: &Spec) -> &oci_spec::runtime::Linux {
        spec.linux().as_ref().expect("linux")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_follows_containerd_override_rules() {
        // (CRI command, CRI args, image entrypoint, image cmd) -> process args
        type Case<'a> = (
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: &[Case<'_>] = &[
            (&[], &[], &["/entry"], &["cmd"], &["/entry", "cmd"]),
            (&[], &["a1"], &["/entry"], &["cmd"], &["/entry", "a1"]),
            (&["/bin/x"], &[], &["/entry"], &["cmd"], &["/bin/x"]),
            (
                &["/bin/x"],
                &["a1", "a2"],
                &["/entry"],
                &["cmd"],
                &["/bin/x", "a1", "a2"],
            ),
            (&[], &[], &[""], &["cmd", "c2"], &["cmd", "c2"]),
            (&[], &["a1"], &[], &["cmd"], &["a1"]),
        ];
        for (command, args, entrypoint, cmd, want) in cases {
            let mut f = Fixture::new();
            f.config.command = strings(command);
            f.config.args = strings(args);
            f.image.entrypoint = strings(entrypoint);
            f.image.cmd = strings(cmd);
            assert_eq!(
                process(&f.spec()).args().clone().unwrap(),
                strings(want),
                "command {command:?} args {args:?} entrypoint {entrypoint:?} cmd {cmd:?}"
            );
        }
        let mut f = Fixture::new();
        f.image.entrypoint.clear();
        f.image.cmd.clear();
        assert!(matches!(f.try_spec(), Err(SpecError::NoCommand)));
    }

    #[test]
    fn env_merges_default_path_hostname_image_and_cri_in_order() {
        let mut f = Fixture::new();
        f.config.envs = vec![
            cri::KeyValue {
                key: "IMG".into(),
                value: b"2".to_vec(),
            },
            cri::KeyValue {
                key: "NEW".into(),
                value: b"x=y".to_vec(),
            },
        ];
        assert_eq!(
            process(&f.spec()).env().clone().unwrap(),
            strings(&["PATH=/img/bin", "HOSTNAME=pod-host", "IMG=2", "NEW=x=y"])
        );
        f.image.env.clear();
        f.config.envs.clear();
        assert_eq!(
            process(&f.spec()).env().clone().unwrap(),
            strings(&[&format!("PATH={DEFAULT_PATH}"), "HOSTNAME=pod-host"])
        );
    }

    #[test]
    fn working_dir_prefers_cri_then_image_then_root() {
        let mut f = Fixture::new();
        assert_eq!(process(&f.spec()).cwd(), Path::new("/img"));
        f.config.working_dir = "/work".into();
        assert_eq!(process(&f.spec()).cwd(), Path::new("/work"));
        f.config.working_dir.clear();
        f.image.working_dir.clear();
        assert_eq!(process(&f.spec()).cwd(), Path::new("/"));
    }

    fn db() -> UserDb {
        UserDb::parse(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n\
             nobody:x:65534:65534:nobody:/:/bin/false\nbroken line\n",
            "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nvideo:x:44:app\n",
        )
    }

    fn sc_with(
        f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
    ) -> cri::LinuxContainerSecurityContext {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        f(&mut sc);
        sc
    }

    fn ru(uid: u32, gid: u32, gids: &[u32]) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: gids.to_vec(),
        }
    }

    #[test]
    fn image_user_forms_resolve_against_passwd_and_group() {
        let db = db();
        let cases: &[(&str, ResolvedUser)] = &[
            ("", ru(0, 0, &[0])),
            ("app", ru(1000, 1000, &[1000, 2000, 44])),
            ("1000", ru(1000, 1000, &[1000, 2000, 44])),
            ("1234", ru(1234, 0, &[0])),
            ("app:video", ru(1000, 44, &[44, 2000])),
            ("app:45", ru(1000, 45, &[45, 2000, 44])),
            ("1234:5", ru(1234, 5, &[5])),
        ];
        for (image_user, want) in cases {
            assert_eq!(
                &resolve_user(None, image_user, &db).unwrap(),
                want,
                "{image_user:?}"
            );
        }
        assert!(matches!(
            resolve_user(None, "ghost", &db),
            Err(SpecError::UnknownUser { name }) if name == "ghost"
        ));
        assert!(matches!(
            resolve_user(None, "app:ghosts", &db),
            Err(SpecError::UnknownGroup { name }) if name == "ghosts"
        ));
    }

    #[test]
    fn security_context_user_overrides_the_image() {
        let db = db();
        let by_uid = sc_with(|sc| sc.run_as_user = Some(cri::Int64Value { value: 1000 }));
        assert_eq!(
            resolve_user(Some(&by_uid), "nobody", &db).unwrap(),
            ru(1000, 1000, &[1000, 2000, 44])
        );
        let by_name = sc_with(|sc| sc.run_as_username = "nobody".into());
        assert_eq!(
            resolve_user(Some(&by_name), "app", &db).unwrap(),
            ru(65534, 65534, &[65534])
        );
        let with_group = sc_with(|sc| {
            sc.run_as_user = Some(cri::Int64Value { value: 1000 });
            sc.run_as_group = Some(cri::Int64Value { value: 3000 });
            sc.supplemental_groups = vec![5, 2000];
        });
        assert_eq!(
            resolve_user(Some(&with_group), "", &db).unwrap(),
            ru(1000, 3000, &[3000, 2000, 44, 5])
        );
        let strict = sc_with(|sc| {
            sc.run_as_user = Some(cri::Int64Value { value: 1000 });
            sc.supplemental_groups = vec![5, 2000];
            sc.supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
        });
        assert_eq!(
            resolve_user(Some(&strict), "", &db).unwrap(),
            ru(1000, 1000, &[1000, 5, 2000])
        );
        // A group alone is refused (CRI), even though the image names a user.
        let group_only = sc_with(|sc| sc.run_as_group = Some(cri::Int64Value { value: 1002 }));
        assert!(matches!(
            resolve_user(Some(&group_only), "app", &db),
            Err(SpecError::GroupWithoutUser { gid: 1002 })
        ));
        let with_name = sc_with(|sc| {
            sc.run_as_username = "nobody".into();
            sc.run_as_group = Some(cri::Int64Value { value: 3000 });
        });
        assert_eq!(resolve_user(Some(&with_name), "", &db).unwrap().gid, 3000);
        let negative = sc_with(|sc| sc.run_as_user = Some(cri::Int64Value { value: -1 }));
        assert!(matches!(
            resolve_user(Some(&negative), "", &db),
            Err(SpecError::IdOutOfRange {
                what: "run_as_user",
                value: -1
            })
        ));
    }

    #[test]
    fn user_database_is_read_from_the_rootfs_but_not_through_symlinks() {
        let rootfs = tempfile::tempdir().unwrap();
        assert_eq!(
            UserDb::read_from_rootfs(rootfs.path()).unwrap(),
            UserDb::default()
        );
        let etc = rootfs.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/group", etc.join("group")).unwrap();
        let db = UserDb::read_from_rootfs(rootfs.path()).unwrap();
        assert_eq!(
            db.passwd,
            vec![PasswdEntry {
                name: "app".into(),
                uid: 1000,
                gid: 1001
            }]
        );
        assert!(
            db.groups.is_empty(),
            "a symlinked /etc/group is not followed"
        );

        let mut f = Fixture::new();
        f.image.user = "app".into();
        let resolved = Resolved::resolve(&f.config, &f.image, rootfs.path()).unwrap();
        assert_eq!(resolved.user, ru(1000, 1001, &[1001]));
        f.resolved = resolved;
        let user = process(&f.spec()).user().clone();
        assert_eq!((user.uid(), user.gid()), (1000, 1001));
        assert_eq!(user.additional_gids().clone(), Some(vec![1001]));
    }

    fn mount_summary(spec: &Spec) -> Vec<(String, String, String, Vec<String>)> {
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m.destination().to_string_lossy().into_owned(),
                    m.typ().clone().unwrap_or_default(),
                    m.source()
                        .as_ref()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    m.options().clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn row(
        dst: &str,
        typ: &str,
        src: &str,
        opts: &[&str],
    ) -> (String, String, String, Vec<String>) {
        (dst.into(), typ.into(), src.into(), strings(opts))
    }

    #[test]
    fn mounts_are_defaults_then_cri_and_sandbox_files_parents_first() {
        let mut f = Fixture::new();
        f.config.mounts = vec![
            cri::Mount {
                container_path: "/data/sub".into(),
                host_path: "/srv/sub".into(),
                ..Default::default()
            },
            cri::Mount {
                container_path: "/data".into(),
                host_path: "/srv/data".into(),
                readonly: true,
                propagation: cri::MountPropagation::PropagationHostToContainer as i32,
                selinux_relabel: true,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/etc/hosts".into(),
                host_path: "/var/lib/kubelet/pods/x/etc-hosts".into(),
                ..Default::default()
            },
        ];
        let spec = f.spec();
        assert_eq!(
            mount_summary(&spec),
            vec![
                row("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
                row(
                    "/dev",
                    "tmpfs",
                    "tmpfs",
                    &["nosuid", "strictatime", "mode=755", "size=65536k"]
                ),
                row(
                    "/dev/pts",
                    "devpts",
                    "devpts",
                    &[
                        "nosuid",
                        "noexec",
                        "newinstance",
                        "ptmxmode=0666",
                        "mode=0620",
                        "gid=5"
                    ]
                ),
                row(
                    "/dev/mqueue",
                    "mqueue",
                    "mqueue",
                    &["nosuid", "noexec", "nodev"]
                ),
                row(
                    "/sys",
                    "sysfs",
                    "sysfs",
                    &["nosuid", "noexec", "nodev", "ro"]
                ),
                row(
                    "/sys/fs/cgroup",
                    "cgroup",
                    "cgroup",
                    &["nosuid", "noexec", "nodev", "relatime", "ro"]
                ),
                row("/data", "bind", "/srv/data", &["rbind", "rslave", "ro"]),
                row(
                    "/data/sub",
                    "bind",
                    "/srv/sub",
                    &["rbind", "rprivate", "rw"]
                ),
                row(
                    "/etc/hosts",
                    "bind",
                    "/var/lib/kubelet/pods/x/etc-hosts",
                    &["rbind", "rprivate", "rw"]
                ),
                row(
                    "/etc/hostname",
                    "bind",
                    "/run/sb1/hostname",
                    &["rbind", "rprivate", "rw"]
                ),
                row(
                    "/etc/resolv.conf",
                    "bind",
                    "/run/sb1/resolv.conf",
                    &["rbind", "rprivate", "rw"]
                ),
                row(
                    "/dev/shm",
                    "bind",
                    "/run/sb1/shm",
                    &["rbind", "rprivate", "rw"]
                ),
            ]
        );
        assert_eq!(linux(&spec).rootfs_propagation().as_deref(), Some("rslave"));
    }

    #[test]
    fn bidirectional_mount_makes_the_rootfs_rshared() {
        let mut f = Fixture::new();
        f.config.mounts = vec![
            cri::Mount {
                container_path: "/a".into(),
                host_path: "/srv/a".into(),
                propagation: cri::MountPropagation::PropagationBidirectional as i32,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/b".into(),
                host_path: "/srv/b".into(),
                propagation: cri::MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            },
        ];
        let spec = f.spec();
        let m = mount_summary(&spec);
        assert!(m.contains(&row("/a", "bind", "/srv/a", &["rbind", "rshared", "rw"])));
        assert_eq!(
            linux(&spec).rootfs_propagation().as_deref(),
            Some("rshared")
        );
        f.config.mounts.clear();
        assert_eq!(linux(&f.spec()).rootfs_propagation(), &None);
    }

    #[test]
    fn readonly_rootfs_makes_sandbox_files_readonly_but_not_shm() {
        let mut f = Fixture::new();
        f.sc().readonly_rootfs = true;
        let spec = f.spec();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/var/lib/strake/c1/rootfs")
        );
        let m = mount_summary(&spec);
        assert!(m.contains(&row(
            "/etc/hosts",
            "bind",
            "/run/sb1/hosts",
            &["rbind", "rprivate", "ro"]
        )));
        assert!(m.contains(&row(
            "/dev/shm",
            "bind",
            "/run/sb1/shm",
            &["rbind", "rprivate", "rw"]
        )));
    }

    #[test]
    fn a_dev_mount_replaces_all_default_dev_mounts() {
        let mut f = Fixture::new();
        f.sandbox.shm_path = None;
        f.config.mounts = vec![cri::Mount {
            container_path: "/dev/".into(),
            host_path: "/dev".into(),
            ..Default::default()
        }];
        let dests: Vec<String> = mount_summary(&f.spec()).into_iter().map(|m| m.0).collect();
        assert_eq!(
            dests,
            strings(&[
                "/proc",
                "/sys",
                "/sys/fs/cgroup",
                "/dev/",
                "/etc/hostname",
                "/etc/hosts",
                "/etc/resolv.conf"
            ])
        );
    }

    #[test]
    fn host_ipc_binds_the_host_shm_and_no_sandbox_shm_keeps_the_default_tmpfs() {
        let mut f = Fixture::new();
        f.ns().ipc = M::Node as i32;
        assert!(mount_summary(&f.spec()).contains(&row(
            "/dev/shm",
            "bind",
            "/dev/shm",
            &["rbind", "rprivate", "rw"]
        )));
        let mut f = Fixture::new();
        f.sandbox.shm_path = None;
        assert!(mount_summary(&f.spec()).contains(&row(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        )));
    }

    #[test]
    fn bad_mounts_are_refused() {
        for (container_path, host_path) in [("relative", "/srv"), ("/ok", "")] {
            let mut f = Fixture::new();
            f.config.mounts = vec![cri::Mount {
                container_path: container_path.into(),
                host_path: host_path.into(),
                ..Default::default()
            }];
            assert!(
                matches!(f.try_spec(), Err(SpecError::InvalidMount { .. })),
                "{container_path:?}"
            );
        }
        let mut f = Fixture::new();
        f.config.mounts = vec![cri::Mount {
            container_path: "/img".into(),
            host_path: "/x".into(),
            image: Some(Default::default()),
            ..Default::default()
        }];
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::UnsupportedMount { .. })
        ));
    }

    #[test]
    fn propagation_needs_a_shared_or_slave_host_mount() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /private rw,relatime - tmpfs tmpfs rw
31 22 0:41 / /slave rw,relatime master:5 - tmpfs tmpfs rw
32 30 0:42 / /private/shared rw,relatime shared:9 - tmpfs tmpfs rw
";
        let mount = |host: &str, p: cri::MountPropagation| cri::Mount {
            container_path: "/m".into(),
            host_path: host.into(),
            propagation: p as i32,
            ..Default::default()
        };
        let check =
            |m: cri::Mount| check_mount_propagation(&[m], mountinfo, |p| Some(p.to_path_buf()));
        use cri::MountPropagation as P;
        assert!(check(mount("/data", P::PropagationBidirectional)).is_ok());
        assert!(check(mount("/slave/x", P::PropagationHostToContainer)).is_ok());
        assert!(check(mount("/private/shared/x", P::PropagationBidirectional)).is_ok());
        assert!(check(mount("/private/x", P::PropagationPrivate)).is_ok());
        assert!(matches!(
            check(mount("/slave/x", P::PropagationBidirectional)),
            Err(SpecError::MountNotShared { mount_point, needed: "shared", .. }) if mount_point == "/slave"
        ));
        assert!(matches!(
            check(mount("/private/x", P::PropagationHostToContainer)),
            Err(SpecError::MountNotShared { mount_point, .. }) if mount_point == "/private"
        ));
        // A missing host path is left for the OCI runtime to report.
        assert!(
            check_mount_propagation(
                &[mount("/private/x", P::PropagationBidirectional)],
                mountinfo,
                |_| None
            )
            .is_ok()
        );
    }

    fn ns_summary(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        linux(spec)
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect()
    }

    #[test]
    fn namespaces_are_joined_from_the_sandbox_per_mode() {
        use LinuxNamespaceType as T;
        let p = |s: &str| Some(PathBuf::from(s));
        let mut f = Fixture::new();
        // No NamespaceOption means POD everywhere.
        assert_eq!(
            ns_summary(&f.spec()),
            vec![
                (T::Pid, p("/proc/42/ns/pid")),
                (T::Ipc, p("/proc/42/ns/ipc")),
                (T::Uts, p("/proc/42/ns/uts")),
                (T::Mount, None),
                (T::Network, p("/proc/42/ns/net")),
            ]
        );
        f.ns().pid = M::Container as i32;
        f.ns().ipc = M::Container as i32;
        f.node.cgroup_namespace = true;
        assert_eq!(
            ns_summary(&f.spec()),
            vec![
                (T::Pid, None),
                (T::Ipc, None),
                (T::Uts, p("/proc/42/ns/uts")),
                (T::Mount, None),
                (T::Network, p("/proc/42/ns/net")),
                (T::Cgroup, None),
            ]
        );
        let mut f = Fixture::new();
        *f.ns() = cri::NamespaceOption {
            network: M::Node as i32,
            pid: M::Node as i32,
            ipc: M::Node as i32,
            ..Default::default()
        };
        f.sandbox.namespaces = SandboxNamespaces::default();
        assert_eq!(ns_summary(&f.spec()), vec![(T::Mount, None)]);
    }

    #[test]
    fn pid_target_needs_the_target_namespace() {
        use LinuxNamespaceType as T;
        let mut f = Fixture::new();
        f.ns().pid = M::Target as i32;
        f.ns().target_id = "other".into();
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::MissingTargetNamespace { target_id }) if target_id == "other"
        ));
        f.target = Some("/proc/77/ns/pid".into());
        assert_eq!(
            ns_summary(&f.spec())[0],
            (T::Pid, Some("/proc/77/ns/pid".into()))
        );
    }

    #[test]
    fn missing_sandbox_namespace_and_user_namespaces_are_errors() {
        let mut f = Fixture::new();
        f.sandbox.namespaces.network = None;
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::MissingSandboxNamespace {
                namespace: "network"
            })
        ));
        // No silent per-container namespace in place of the pod's.
        let mut f = Fixture::new();
        f.sandbox.namespaces.pid = None;
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::SharedPidNamespaceUnsupported)
        ));
        let mut f = Fixture::new();
        f.ns().userns_options = Some(cri::UserNamespace {
            mode: M::Pod as i32,
            ..Default::default()
        });
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::UserNamespaceUnsupported)
        ));
    }

    fn caps(spec: &Spec) -> LinuxCapabilities {
        process(spec).capabilities().clone().unwrap()
    }

    fn set(c: &[Capability]) -> Capabilities {
        c.iter().copied().collect()
    }

    #[test]
    fn default_capabilities_are_containerds() {
        let f = Fixture::new();
        let c = caps(&f.spec());
        assert_eq!(c.bounding().clone().unwrap(), default_capabilities());
        assert_eq!(c.effective().clone().unwrap(), default_capabilities());
        assert_eq!(c.permitted().clone().unwrap(), default_capabilities());
        assert_eq!(c.inheritable(), &None);
        assert_eq!(c.ambient(), &None);
        assert_eq!(default_capabilities().len(), 14);
    }

    #[test]
    fn capability_add_and_drop_follow_containerd_order() {
        use Capability as C;
        let with = |add: &[&str], drop: &[&str]| {
            let mut f = Fixture::new();
            f.sc().capabilities = Some(cri::Capability {
                add_capabilities: strings(add),
                drop_capabilities: strings(drop),
                add_ambient_capabilities: vec![],
            });
            f.try_spec().map(|s| caps(&s).bounding().clone().unwrap())
        };
        let mut want = default_capabilities();
        want.insert(C::NetAdmin);
        want.insert(C::SysTime);
        want.remove(&C::Chown);
        assert_eq!(
            with(&["NET_ADMIN", "cap_sys_time"], &["CHOWN"]).unwrap(),
            want
        );

        let mut want = all_capabilities();
        want.remove(&C::Chown);
        assert_eq!(with(&["ALL"], &["CHOWN"]).unwrap(), want);
        assert_eq!(
            with(&["NET_BIND_SERVICE"], &["all"]).unwrap(),
            set(&[C::NetBindService])
        );
        assert_eq!(with(&["ALL"], &["ALL"]).unwrap(), set(&[]));
        assert!(matches!(
            with(&["NOT_A_CAP"], &[]),
            Err(SpecError::UnknownCapability { name }) if name == "NOT_A_CAP"
        ));

        let mut f = Fixture::new();
        f.sc().capabilities = Some(cri::Capability {
            add_ambient_capabilities: strings(&["NET_RAW", "NET_ADMIN"]),
            ..Default::default()
        });
        let c = caps(&f.spec());
        assert_eq!(c.ambient().clone().unwrap(), set(&[C::NetRaw, C::NetAdmin]));
        assert_eq!(
            c.inheritable().clone().unwrap(),
            set(&[C::NetRaw, C::NetAdmin])
        );
        assert!(c.permitted().as_ref().unwrap().contains(&C::NetAdmin));
    }

    #[test]
    fn all_means_the_daemons_bounding_set_when_known() {
        use Capability as C;
        assert_eq!(all_capabilities().len(), 41);
        assert_eq!(
            capabilities_from_mask(0b101),
            set(&[C::Chown, C::DacReadSearch])
        );
        assert_eq!(capabilities_from_mask(0x1ff_ffff_ffff), all_capabilities());
        let mut without_sys_resource = all_capabilities();
        without_sys_resource.remove(&C::SysResource);
        assert_eq!(
            capabilities_from_mask(0x1ff_feff_ffff),
            without_sys_resource
        );
        assert!(current_bounding_capabilities().is_some());

        let mut f = Fixture::new();
        f.node.bounding_capabilities = Some(set(&[C::Chown, C::NetAdmin]));
        f.sc().capabilities = Some(cri::Capability {
            add_capabilities: strings(&["ALL"]),
            ..Default::default()
        });
        assert_eq!(
            caps(&f.spec()).bounding().clone().unwrap(),
            set(&[C::Chown, C::NetAdmin])
        );
    }

    #[test]
    fn privileged_gets_everything_and_no_confinement() {
        let mut f = Fixture::new();
        f.sc().privileged = true;
        assert!(matches!(f.try_spec(), Err(SpecError::PrivilegedNotAllowed)));
        f.sandbox_config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .unwrap()
            .privileged = true;
        f.sc().seccomp = Some(cri::SecurityProfile::default()); // RuntimeDefault, ignored
        f.sc().capabilities = Some(cri::Capability {
            drop_capabilities: strings(&["ALL"]),
            ..Default::default()
        });
        let mut null = LinuxDevice::default();
        null.set_path("/dev/null".into())
            .set_typ(LinuxDeviceType::C)
            .set_major(1)
            .set_minor(3);
        f.resolved.host_devices = vec![null.clone()];
        let spec = f.spec();
        assert_eq!(caps(&spec).bounding().clone().unwrap(), all_capabilities());
        let l = linux(&spec);
        assert_eq!(l.masked_paths().clone(), Some(vec![]));
        assert_eq!(l.readonly_paths().clone(), Some(vec![]));
        assert_eq!(l.seccomp(), &None);
        assert_eq!(l.devices().clone(), Some(vec![null]));
        let rules = l.resources().as_ref().unwrap().devices().clone().unwrap();
        assert_eq!(rules.len(), 1);
        assert!(rules[0].allow());
        assert_eq!(rules[0].access().as_deref(), Some("rwm"));
        let m = mount_summary(&spec);
        assert!(m.contains(&row(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "rw"]
        )));
        assert!(m.contains(&row(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "rw"]
        )));
    }

    #[test]
    fn no_new_privs_and_tty_are_passed_through() {
        let mut f = Fixture::new();
        assert_eq!(process(&f.spec()).no_new_privileges(), Some(false));
        assert_eq!(process(&f.spec()).terminal(), Some(false));
        f.sc().no_new_privs = true;
        f.config.tty = true;
        assert_eq!(process(&f.spec()).no_new_privileges(), Some(true));
        assert_eq!(process(&f.spec()).terminal(), Some(true));
    }

    #[test]
    fn devices_become_nodes_and_cgroup_rules() {
        let devices = resolve_devices(&[cri::Device {
            container_path: "/dev/mynull".into(),
            host_path: "/dev/null".into(),
            permissions: "rw".into(),
        }])
        .unwrap();
        assert_eq!(devices.len(), 1);
        let d = &devices[0];
        assert_eq!(
            (
                d.device.path().as_path(),
                d.device.typ(),
                d.device.major(),
                d.device.minor(),
                d.access.as_str()
            ),
            (Path::new("/dev/mynull"), LinuxDeviceType::C, 1, 3, "rw")
        );
        assert!(matches!(
            resolve_devices(&[cri::Device {
                container_path: "/dev/x".into(),
                host_path: "/etc/hostname".into(),
                permissions: String::new(),
            }]),
            Err(SpecError::NotADevice { .. })
        ));

        let mut f = Fixture::new();
        f.resolved.devices = devices;
        let spec = f.spec();
        let l = linux(&spec);
        assert_eq!(
            l.devices().as_ref().unwrap()[0].path(),
            Path::new("/dev/mynull")
        );
        let rules: Vec<String> = l
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| format!("{} {r}", r.allow()))
            .collect();
        assert_eq!(rules, strings(&["false a *:* rwm", "true c 1:3 rw"]));
    }

    #[test]
    fn resources_map_to_linux_resources() {
        let mut f = Fixture::new();
        f.node.hugepage_sizes = BTreeSet::from(["2MB".to_string()]);
        assert_eq!(process(&f.spec()).oom_score_adj(), None);
        f.config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: 999,
            cpuset_cpus: "0-1".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![
                cri::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 4 << 20,
                },
                // A size the host cannot limit is left out.
                cri::HugepageLimit {
                    page_size: "1GB".into(),
                    limit: 0,
                },
            ],
            unified: HashMap::from([("memory.high".to_string(), "50000000".to_string())]),
            memory_swap_limit_in_bytes: 0,
        });
        let spec = f.spec();
        assert_eq!(process(&spec).oom_score_adj(), Some(999));
        let r = linux(&spec).resources().clone().unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["cpu"],
            serde_json::json!({"period": 100000, "quota": 50000, "shares": 512, "cpus": "0-1", "mems": "0"})
        );
        assert_eq!(
            json["memory"],
            serde_json::json!({"limit": 67108864, "swap": 67108864})
        );
        assert_eq!(
            json["hugepageLimits"],
            serde_json::json!([{"pageSize": "2MB", "limit": 4194304}])
        );
        assert_eq!(
            json["unified"],
            serde_json::json!({"memory.high": "50000000"})
        );

        f.config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            memory_swap_limit_in_bytes: 128 << 20,
            ..Default::default()
        });
        let r = linux(&f.spec()).resources().clone().unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap()["memory"],
            serde_json::json!({"limit": 67108864, "swap": 134217728})
        );
        assert_eq!(r.cpu(), &None);
        assert_eq!(r.unified(), &None);

        f.config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            cpu_shares: -2,
            cpu_period: -1,
            cpu_quota: -1,
            ..Default::default()
        });
        let r = linux(&f.spec()).resources().clone().unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap()["cpu"],
            serde_json::json!({"quota": -1})
        );
        assert_eq!(r.memory(), &None);
    }

    #[test]
    fn hugepage_limits_are_left_out_without_a_hugetlb_controller() {
        // What upstream's kubelet sends on a host whose kernel offers 2 MiB and 1 GiB pages:
        // a zero limit for each. Without a hugetlb controller no size can be limited.
        let mut f = Fixture::new();
        f.config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            hugepage_limits: ["2MB", "1GB"]
                .map(|size| cri::HugepageLimit {
                    page_size: size.into(),
                    limit: 0,
                })
                .into(),
            ..Default::default()
        });
        assert_eq!(f.node.hugepage_sizes, BTreeSet::new());
        let r = linux(&f.spec()).resources().clone().unwrap();
        assert_eq!(r.hugepage_limits(), &None);

        f.node.hugepage_sizes = ["1GB", "2MB"].map(String::from).into();
        let r = linux(&f.spec()).resources().clone().unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap()["hugepageLimits"],
            serde_json::json!([{"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 0}])
        );
    }

    #[test]
    fn sysctls_rlimits_and_annotations() {
        let mut f = Fixture::new();
        let spec = f.spec();
        assert_eq!(linux(&spec).sysctl(), &None);
        assert_eq!(process(&spec).rlimits(), &None);
        assert_eq!(spec.hostname(), &None);
        assert_eq!(
            spec.annotations().clone().unwrap(),
            HashMap::from(
                [
                    ("io.kubernetes.cri.container-type", "container"),
                    ("io.kubernetes.cri.sandbox-id", "sb1"),
                    ("io.kubernetes.cri.sandbox-name", "pod"),
                    ("io.kubernetes.cri.sandbox-namespace", "default"),
                    ("io.kubernetes.cri.sandbox-uid", "uid-1"),
                    ("io.kubernetes.cri.container-name", "app"),
                    (
                        "io.kubernetes.cri.image-name",
                        "docker.io/library/busybox:latest"
                    ),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
            )
        );
        // The infra container starts the pod's sandbox in runtimes that group by annotation.
        f.infra = true;
        let infra = f.spec().annotations().clone().unwrap();
        assert_eq!(infra["io.kubernetes.cri.container-type"], "sandbox");
        assert_eq!(infra["io.kubernetes.cri.sandbox-id"], "sb1");
        f.infra = false;

        f.sandbox_config.linux.as_mut().unwrap().sysctls = HashMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "0".to_string(),
        )]);
        let rlimit: PosixRlimit = serde_json::from_value(
            serde_json::json!({"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 1024}),
        )
        .unwrap();
        f.node.rlimits = vec![rlimit];
        let spec = f.spec();
        assert_eq!(
            linux(&spec).sysctl().clone().unwrap()["net.ipv4.ip_unprivileged_port_start"],
            "0"
        );
        assert_eq!(process(&spec).rlimits().clone(), Some(vec![rlimit]));
    }

    #[test]
    fn cgroups_path_follows_the_driver() {
        let mut f = Fixture::new();
        assert_eq!(
            linux(&f.spec()).cgroups_path().clone(),
            Some(PathBuf::from("/kubepods/podabc/c1"))
        );
        f.driver = CgroupDriver::Systemd;
        f.sandbox_config.linux.as_mut().unwrap().cgroup_parent =
            "/kubepods.slice/kubepods-podabc.slice".into();
        assert_eq!(
            linux(&f.spec()).cgroups_path().clone(),
            Some(PathBuf::from("kubepods-podabc.slice:strake:c1"))
        );
    }

    #[test]
    fn masked_and_readonly_paths_default_to_containerds_and_can_be_replaced() {
        let mut f = Fixture::new();
        let spec = f.spec();
        assert_eq!(
            linux(&spec).masked_paths().clone(),
            Some(default_masked_paths())
        );
        assert_eq!(
            linux(&spec).readonly_paths().clone(),
            Some(default_readonly_paths())
        );
        assert!(default_masked_paths().contains(&"/proc/kcore".to_string()));
        f.sc().masked_paths = strings(&["/proc/x"]);
        f.sc().readonly_paths = strings(&["/proc/y"]);
        let spec = f.spec();
        assert_eq!(
            linux(&spec).masked_paths().clone(),
            Some(strings(&["/proc/x"]))
        );
        assert_eq!(
            linux(&spec).readonly_paths().clone(),
            Some(strings(&["/proc/y"]))
        );
    }

    fn denied(profile: &LinuxSeccomp) -> Vec<String> {
        profile
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.args().is_none())
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn seccomp_profile_selection() {
        use cri::security_profile::ProfileType as T;
        let profile = |t: T, r: &str| cri::SecurityProfile {
            profile_type: t as i32,
            localhost_ref: r.into(),
        };
        let mut f = Fixture::new();
        assert_eq!(linux(&f.spec()).seccomp(), &None, "unset means unconfined");

        f.sc().seccomp = Some(profile(T::RuntimeDefault, ""));
        let spec = f.spec();
        let p = linux(&spec).seccomp().clone().unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert!(denied(&p).contains(&"mount".to_string()));

        f.sc().seccomp = Some(profile(T::Unconfined, ""));
        assert_eq!(linux(&f.spec()).seccomp(), &None);

        f.sc().seccomp = Some(profile(T::Localhost, "/etc/profiles/p.json"));
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::SeccompProfileNotLoaded { .. })
        ));
        let mut mine = LinuxSeccomp::default();
        mine.set_default_action(LinuxSeccompAction::ScmpActErrno);
        f.resolved.localhost_seccomp = Some(mine.clone());
        assert_eq!(linux(&f.spec()).seccomp().clone(), Some(mine));

        f.sc().seccomp = Some(profile(T::Localhost, "relative.json"));
        assert!(matches!(
            f.try_spec(),
            Err(SpecError::InvalidSeccompPath { .. })
        ));

        #[allow(deprecated)]
        let deprecated = |path: &str| {
            let sc = sc_with(|sc| sc.seccomp_profile_path = path.into());
            seccomp_choice(Some(&sc))
        };
        assert_eq!(
            deprecated("runtime/default").unwrap(),
            SeccompChoice::RuntimeDefault
        );
        assert_eq!(
            deprecated("docker/default").unwrap(),
            SeccompChoice::RuntimeDefault
        );
        assert_eq!(deprecated("unconfined").unwrap(), SeccompChoice::Unconfined);
        assert_eq!(
            deprecated("localhost//p.json").unwrap(),
            SeccompChoice::Localhost("/p.json".into())
        );
        assert!(deprecated("bogus").is_err());
    }

    #[test]
    fn default_seccomp_profile_gives_back_syscalls_guarded_by_held_capabilities() {
        let p = default_seccomp_profile(&default_capabilities());
        let d = denied(&p);
        for name in [
            "mount",
            "unshare",
            "setns",
            "bpf",
            "kexec_load",
            "init_module",
            "reboot",
            "keyctl",
            "clone3",
        ] {
            assert!(d.contains(&name.to_string()), "{name} is denied by default");
        }
        assert!(!d.contains(&"read".to_string()));
        let syscalls = p.syscalls().clone().unwrap();
        let clone = syscalls.iter().find(|s| s.names() == &["clone"]).unwrap();
        assert_eq!(
            serde_json::to_value(clone).unwrap(),
            serde_json::json!({
                "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                "args": [{"index": 0, "value": 0x1000_0000u64, "valueTwo": 0x1000_0000u64, "op": "SCMP_CMP_MASKED_EQ"}]
            })
        );
        let clone3 = syscalls.iter().find(|s| s.names() == &["clone3"]).unwrap();
        assert_eq!(clone3.errno_ret(), Some(38));

        let mut with_admin = default_capabilities();
        with_admin.insert(Capability::SysAdmin);
        with_admin.insert(Capability::SysTime);
        let d = denied(&default_seccomp_profile(&with_admin));
        for name in ["mount", "unshare", "bpf", "clock_settime", "clone3"] {
            assert!(!d.contains(&name.to_string()), "{name} is given back");
        }
        assert!(d.contains(&"kexec_load".to_string()));
    }

    #[test]
    fn localhost_seccomp_profile_is_loaded_from_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read","write"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let p = load_seccomp_profile(&path).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(
            p.syscalls().as_ref().unwrap()[0].names(),
            &["read", "write"]
        );
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            load_seccomp_profile(&path),
            Err(SpecError::LoadSeccompProfile { .. })
        ));

        let mut f = Fixture::new();
        f.sc().seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: dir
                .path()
                .join("missing.json")
                .to_string_lossy()
                .into_owned(),
        });
        assert!(matches!(
            Resolved::resolve(&f.config, &f.image, dir.path()),
            Err(SpecError::LoadSeccompProfile { .. })
        ));
    }

    #[test]
    fn stop_signal_prefers_cri_then_image_then_sigterm() {
        let mut f = Fixture::new();
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGTERM);
        f.image.stop_signal = "SIGQUIT".into();
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGQUIT);
        f.config.stop_signal = cri::Signal::Sigusr1 as i32;
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGUSR1);
        f.config.stop_signal = cri::Signal::Sigrtminplus3 as i32;
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGRTMIN() + 3);
        f.config.stop_signal = cri::Signal::Sigrtmaxminus2 as i32;
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGRTMAX() - 2);
        f.config.stop_signal = 0;
        f.image.stop_signal = "bogus".into();
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGTERM);
        for junk in [
            "SIGRTMIN+2147483647",
            "RTMAX-2147483647",
            "4294967311",
            "1e3",
        ] {
            f.image.stop_signal = junk.into();
            assert_eq!(stop_signal(&f.config, &f.image), libc::SIGTERM, "{junk}");
        }
        f.config.stop_signal = i32::MAX;
        f.image.stop_signal = "SIGINT".into();
        assert_eq!(stop_signal(&f.config, &f.image), libc::SIGINT);
        f.config.stop_signal = 0;

        for (name, want) in [
            ("TERM", Some(15)),
            ("sigkill", Some(9)),
            ("9", Some(9)),
            ("SIGRTMIN", Some(libc::SIGRTMIN())),
            ("RTMAX-1", Some(libc::SIGRTMAX() - 1)),
            ("SIGRTMIN+99", None),
            // Overflowing or junk numbers give no signal (the caller's default), never a wrap.
            ("SIGRTMIN+2147483647", None),
            ("RTMAX--2147483648", None),
            ("RTMAX-2147483647", None),
            ("RTMIN+-5", None),
            ("99999999999999999999", None),
            ("-9", None),
            ("SIGRTMIN+3x", None),
            ("0", None),
            ("", None),
        ] {
            assert_eq!(signal_number(name), want, "{name:?}");
        }
    }

    #[test]
    fn apparmor_only_when_enabled_and_localhost() {
        let mut f = Fixture::new();
        f.sc().apparmor = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "k8s-deny-write".into(),
        });
        assert_eq!(process(&f.spec()).apparmor_profile(), &None);
        f.node.apparmor_enabled = true;
        assert_eq!(
            process(&f.spec()).apparmor_profile().as_deref(),
            Some("k8s-deny-write")
        );
    }

    #[test]
    fn image_config_converts_and_spec_serializes_as_oci_json() {
        let config: oci_spec::image::Config = serde_json::from_value(serde_json::json!({
            "User": "app:app", "Env": ["A=1"], "Entrypoint": ["/e"], "Cmd": ["c"], "WorkingDir": "/w",
            "StopSignal": "SIGQUIT"
        }))
        .unwrap();
        assert_eq!(
            ImageProcessConfig::from(&config),
            ImageProcessConfig {
                entrypoint: strings(&["/e"]),
                cmd: strings(&["c"]),
                env: strings(&["A=1"]),
                working_dir: "/w".into(),
                user: "app:app".into(),
                stop_signal: "SIGQUIT".into(),
            }
        );
        let json = serde_json::to_value(Fixture::new().spec()).unwrap();
        assert_eq!(json["ociVersion"], "1.0.2-dev");
        assert_eq!(json["root"]["path"], "/var/lib/strake/c1/rootfs");
        assert_eq!(json["linux"]["cgroupsPath"], "/kubepods/podabc/c1");
        assert_eq!(
            json["process"]["user"],
            serde_json::json!({"uid": 0, "gid": 0, "additionalGids": []})
        );
        assert!(json.get("hostname").is_none());
    }
}
