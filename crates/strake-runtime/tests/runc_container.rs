//! Component tests: containers from [`strake_runtime::spec::build_spec`] run by real OCI runtimes
//! (runc and crun) through the [`strake_runtime::runc::Runc`] seam. They need root, `runc`,
//! `/usr/bin/crun` and Debian's busybox-static at `/bin/busybox`, and fail (naming what is missing)
//! without.
//!
//! Each test keeps everything private: a temp dir with the rootfs, bundle and the runtime's
//! `--root` state, a cgroup parent `strake-test-<pid>-<name>` it creates in every hierarchy, and
//! guards that force-delete the container and remove those cgroups on every exit path.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::io::Read;
use strake_runtime::cgroups::{CgroupDriver, CgroupLayout, CgroupMode, cgroups_path};

use oci_spec::runtime::{LinuxResources, Spec};
use strake_runtime::runc::{
    CreateOptions, ExecOptions, ProcessIo, Runc, RuncCli, RuncConfig, Status,
};
use strake_runtime::spec::{
    ImageProcessConfig, NodeOptions, Resolved, SandboxFacts, SandboxNamespaces, SpecInput,
    build_spec, current_bounding_capabilities,
};
use strake_types::cri;

const MEMORY_LIMIT: i64 = 64 << 20;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Fails the test, naming what is missing, unless this machine can run it: the test bed
/// (`make testbed`) installs everything, so a missing tool is a broken bed, not a pass.
fn require(runtime: &Path) {
    assert!(
        is_root(),
        "this test needs root (it runs containers and creates cgroups)"
    );
    for p in [runtime, Path::new("/bin/busybox")] {
        assert!(
            p.exists(),
            "{} is missing: install it with `make testbed`",
            p.display()
        );
    }
}

fn runc_binary() -> PathBuf {
    ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"))
}

/// A cgroup parent the test owns in every hierarchy; removed (leaves first) on drop.
struct CgroupParent {
    name: String,
    dirs: Vec<PathBuf>,
}

impl CgroupParent {
    fn create(layout: &CgroupLayout, name: String) -> Self {
        let mut dirs = Vec::new();
        for root in layout.hierarchy_roots() {
            let dir = root.join(&name);
            std::fs::create_dir(&dir).unwrap();
            dirs.push(dir);
        }
        CgroupParent { name, dirs }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for dir in &self.dirs {
            remove_cgroup_tree(dir);
        }
    }
}

/// rmdir a cgroup and the children under it (never files: cgroupfs refuses those anyway).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // A cgroup whose last task just exited can be busy for a moment.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => return,
        }
    }
}

/// Force-deletes the container on drop.
struct ContainerGuard<'a> {
    runtime: &'a RuncCli,
    id: String,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        let _ = self.runtime.delete(&self.id, true);
    }
}

/// A rootfs of busybox-static and its applets.
fn make_rootfs(rootfs: &Path) {
    for dir in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "sleep", "cat", "id", "touch", "hostname", "readlink", "unshare", "head",
        "tail",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
}

/// Fields drop in order: the cgroups go before the temp dir.
struct Setup {
    bundle: PathBuf,
    runtime: RuncCli,
    layout: CgroupLayout,
    cgroup: CgroupParent,
    _dir: tempfile::TempDir,
}

/// crun 1.8 refuses to run at all on a hybrid host whose cgroup2 mount holds controllers (this
/// VM's has hugetlb): "cgroups in hybrid mode not supported". There the test runs crun through a
/// wrapper that hides that mount under a tmpfs in a private mount namespace of its own, so crun
/// sees a v1 host; the host's mounts are untouched. Elsewhere crun runs directly.
fn crun_needs_wrapper(layout: &CgroupLayout) -> Option<PathBuf> {
    let unified = layout.unified.as_ref()?;
    let has_controllers = std::fs::read_to_string(unified.join("cgroup.controllers"))
        .is_ok_and(|c| !c.trim().is_empty());
    (layout.mode == CgroupMode::Hybrid && has_controllers).then(|| unified.clone())
}

fn setup(name: &str, binary: &Path) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    make_rootfs(&bundle.join("rootfs"));
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let layout = CgroupLayout::detect().unwrap();
    let mut config = RuncConfig {
        binary: binary.to_path_buf(),
        root: Some(state),
        systemd_cgroup: false,
        temp_dir: dir.path().to_path_buf(),
        env: Vec::new(),
        global_args: Vec::new(),
    };
    if binary.ends_with("crun")
        && let Some(unified) = crun_needs_wrapper(&layout)
    {
        let wrapper = dir.path().join("crun-wrapper.sh");
        std::fs::write(
            &wrapper,
            format!(
                "exec unshare --mount --propagation private /bin/sh -c \
                 'mount -t tmpfs -o size=64k strake-test {} && exec {} \"$@\"' crun \"$@\"\n",
                unified.display(),
                binary.display()
            ),
        )
        .unwrap();
        // Run by the shell rather than executed, so no fork elsewhere can make it ETXTBSY.
        config.binary = PathBuf::from("/bin/sh");
        config.global_args = vec![wrapper.to_string_lossy().into_owned()];
    }
    let runtime = RuncCli::new(config);
    let cgroup = CgroupParent::create(
        &layout,
        format!("strake-test-{}-{name}", std::process::id()),
    );
    Setup {
        bundle,
        runtime,
        layout,
        cgroup,
        _dir: dir,
    }
}

/// A container config in the shape kubelet sends, for a host-network pod.
fn container_config(command: &[&str], readonly_rootfs: bool, uid: i64) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: MEMORY_LIMIT,
                cpu_shares: 256,
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: uid }),
                readonly_rootfs,
                no_new_privs: true,
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// A host-network "sandbox" with no files of its own.
fn host_sandbox() -> SandboxFacts {
    SandboxFacts {
        id: "sandbox".into(),
        hostname: "pod".into(),
        ..Default::default()
    }
}

/// Writes `config.json` for the container and returns its cgroupsPath.
fn write_bundle(
    setup: &Setup,
    id: &str,
    config: &cri::ContainerConfig,
    sandbox: &SandboxFacts,
) -> String {
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "pod".into(),
            uid: "uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}", setup.cgroup.name),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                privileged: config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .is_some_and(|sc| sc.privileged),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rootfs = setup.bundle.join("rootfs");
    let image = ImageProcessConfig::default();
    let resolved = Resolved::resolve(config, &image, &rootfs).unwrap();
    let spec = build_spec(&SpecInput {
        container_id: id,
        config,
        sandbox_config: &sandbox_config,
        sandbox,
        image: &image,
        image_name: "busybox",
        rootfs: &rootfs,
        cgroup_driver: CgroupDriver::Cgroupfs,
        target_pid_namespace: None,
        resolved: &resolved,
        node: &NodeOptions {
            bounding_capabilities: current_bounding_capabilities(),
            ..Default::default()
        },
        infra: false,
    })
    .unwrap();
    std::fs::write(
        setup.bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    cgroups_path(
        CgroupDriver::Cgroupfs,
        &format!("/{}", setup.cgroup.name),
        id,
    )
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates and starts a container with stdout and stderr to files; returns their paths.
fn create_and_start(setup: &Setup, id: &str) -> (PathBuf, PathBuf) {
    let stdout = setup.bundle.join("stdout");
    let stderr = setup.bundle.join("stderr");
    setup
        .runtime
        .create(
            id,
            &setup.bundle,
            CreateOptions {
                pid_file: Some(setup.bundle.join("pid")),
                io: ProcessIo {
                    stdin: None,
                    stdout: Some(std::fs::File::create(&stdout).unwrap().into()),
                    stderr: Some(std::fs::File::create(&stderr).unwrap().into()),
                },
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(setup.runtime.state(id).unwrap().status, Status::Created);
    setup.runtime.start(id).unwrap();
    (stdout, stderr)
}

/// The full life of a container under `binary`: create, start, output, running state, memory
/// limit in its cgroup, kill, stopped state, delete.
fn run_lifecycle(name: &str, binary: &Path) {
    require(binary);
    let setup = setup(name, binary);
    let id = format!("strake-test-{}-{name}", std::process::id());
    let config = container_config(&["sh", "-c", "echo hello; id -u; sleep 30"], false, 1000);
    let cgroups_path = write_bundle(&setup, &id, &config, &host_sandbox());
    let _guard = ContainerGuard {
        runtime: &setup.runtime,
        id: id.clone(),
    };

    let (stdout, stderr) = create_and_start(&setup, &id);
    wait_until("the container's output", Duration::from_secs(10), || {
        std::fs::read_to_string(&stdout).is_ok_and(|s| s.lines().count() >= 2)
    });
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        "hello\n1000\n",
        "stderr: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );

    let state = setup.runtime.state(&id).unwrap();
    assert_eq!(state.status, Status::Running);
    assert!(state.pid > 0);
    assert_eq!(state.bundle, setup.bundle);
    assert_eq!(
        setup
            .runtime
            .list()
            .unwrap()
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    let pid_file = std::fs::read_to_string(setup.bundle.join("pid")).unwrap();
    assert_eq!(pid_file.trim(), state.pid.to_string());

    let cgroup = setup
        .layout
        .container_cgroup(CgroupDriver::Cgroupfs, &cgroups_path);
    assert_eq!(cgroup.memory_limit().unwrap(), Some(MEMORY_LIMIT as u64));
    assert!(cgroup.memory_usage().unwrap().is_some_and(|u| u > 0));
    assert!(cgroup.memory_working_set().unwrap().is_some_and(|u| u > 0));
    assert_eq!(cgroup.oom_kills().unwrap(), Some(0));

    // exec: a second process in the running container, with the container's process spec.
    let mut process = Spec::load(setup.bundle.join("config.json"))
        .unwrap()
        .process()
        .clone()
        .unwrap();
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "echo exec-ok; exit 7".into(),
    ]));
    let (mut reader, writer) = std::io::pipe().unwrap();
    let status = setup
        .runtime
        .exec(
            &id,
            &process,
            ExecOptions {
                io: ProcessIo {
                    stdout: Some(writer.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(status.code(), Some(7));
    let mut out = String::new();
    reader.read_to_string(&mut out).unwrap();
    assert_eq!(out, "exec-ok\n");

    // update: a lower memory limit lands in the same cgroup.
    let resources: LinuxResources = serde_json::from_value(serde_json::json!({
        "memory": {"limit": MEMORY_LIMIT / 2, "swap": MEMORY_LIMIT / 2}
    }))
    .unwrap();
    setup.runtime.update(&id, &resources).unwrap();
    assert_eq!(
        cgroup.memory_limit().unwrap(),
        Some(MEMORY_LIMIT as u64 / 2)
    );

    // stats: runc's `events --stats` (crun has no `events`).
    if name == "runc" {
        let stats = setup.runtime.stats(&id).unwrap();
        assert!(stats.memory.usage.usage > 0);
        assert_eq!(stats.memory.usage.limit, MEMORY_LIMIT as u64 / 2);
        // busybox sh execs its last command: sleep is the only task.
        assert_eq!(stats.pids.current, 1);
    }

    setup.runtime.kill(&id, 9, false).unwrap();
    wait_until("the container to stop", Duration::from_secs(10), || {
        setup
            .runtime
            .state(&id)
            .is_ok_and(|s| s.status == Status::Stopped)
    });
    setup.runtime.delete(&id, false).unwrap();
    assert!(
        setup.runtime.state(&id).is_err(),
        "deleted containers have no state"
    );
    assert!(setup.runtime.list().unwrap().is_empty());
}

#[test]
fn runc_runs_a_container_from_a_generated_spec() {
    run_lifecycle("runc", &runc_binary());
}

#[test]
fn crun_runs_the_same_container_through_the_same_seam() {
    run_lifecycle("crun", Path::new("/usr/bin/crun"));
}

#[test]
fn readonly_rootfs_refuses_writes() {
    let binary = runc_binary();
    require(&binary);
    let setup = setup("ro", &binary);
    let id = format!("strake-test-{}-ro", std::process::id());
    // Root inside the container, so the refusal comes from the read-only mount and not from
    // file permissions.
    let config = container_config(
        &[
            "sh",
            "-c",
            "touch /tmp/x && echo wrote || echo refused; id -u",
        ],
        true,
        0,
    );
    let (out, err) = run_to_exit(&setup, &id, &config);
    assert_eq!(out, "refused\n0\n");
    assert!(
        err.contains("Read-only file system"),
        "touch reports EROFS: {err}"
    );
}

/// A stand-in for the pause process: `sleep` in new network, IPC and UTS namespaces with the pod's
/// hostname. Killed and reaped on drop.
struct FakePause(std::process::Child);

impl FakePause {
    fn start(hostname: &str) -> Self {
        let child = std::process::Command::new("unshare")
            .args(["--net", "--ipc", "--uts", "/bin/sh", "-c"])
            .arg(format!("hostname {hostname} && exec sleep 60"))
            .spawn()
            .unwrap();
        let pause = FakePause(child);
        let comm = format!("/proc/{}/comm", pause.0.id());
        wait_until("the pause stand-in", Duration::from_secs(10), || {
            std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
        });
        pause
    }
}

impl Drop for FakePause {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn container_joins_the_sandbox_namespaces_and_files() {
    let binary = runc_binary();
    require(&binary);
    let setup = setup("join", &binary);
    let id = format!("strake-test-{}-join", std::process::id());
    let pause = FakePause::start("strake-pod");
    let pid = pause.0.id();

    let files = setup.bundle.join("sandbox-files");
    let shm = files.join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    std::fs::write(files.join("hostname"), "strake-pod\n").unwrap();
    std::fs::write(files.join("hosts"), "127.0.0.1 localhost strake-pod\n").unwrap();
    std::fs::write(files.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
    let namespaces = SandboxNamespaces::of_process(pid);
    let sandbox = SandboxFacts {
        id: "sandbox".into(),
        hostname: "strake-pod".into(),
        namespaces: SandboxNamespaces {
            pid: None,
            ..namespaces
        },
        hosts_path: Some(files.join("hosts")),
        resolv_conf_path: Some(files.join("resolv.conf")),
        hostname_path: Some(files.join("hostname")),
        shm_path: Some(shm.clone()),
    };
    let mut config = container_config(
        &[
            "sh",
            "-c",
            "hostname; readlink /proc/self/ns/net; readlink /proc/self/ns/ipc; \
             cat /etc/hostname /etc/resolv.conf; echo $HOSTNAME; echo shared > /dev/shm/from-container",
        ],
        false,
        0,
    );
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|sc| sc.namespace_options.as_mut())
    {
        ns.network = cri::NamespaceMode::Pod as i32;
        ns.ipc = cri::NamespaceMode::Pod as i32;
    }
    write_bundle(&setup, &id, &config, &sandbox);
    let _guard = ContainerGuard {
        runtime: &setup.runtime,
        id: id.clone(),
    };

    let (stdout, stderr) = create_and_start(&setup, &id);
    wait_until("the container to exit", Duration::from_secs(10), || {
        setup
            .runtime
            .state(&id)
            .is_ok_and(|s| s.status == Status::Stopped)
    });
    let link = |ns: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        format!(
            "strake-pod\n{}\n{}\nstrake-pod\nnameserver 192.0.2.53\nstrake-pod\n",
            link("net"),
            link("ipc")
        ),
        "stderr: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_to_string(shm.join("from-container")).unwrap(),
        "shared\n"
    );
    setup.runtime.delete(&id, false).unwrap();
}

/// Creates, starts and waits for a short-lived container; returns its stdout and stderr.
fn run_to_exit(setup: &Setup, id: &str, config: &cri::ContainerConfig) -> (String, String) {
    write_bundle(setup, id, config, &host_sandbox());
    let _guard = ContainerGuard {
        runtime: &setup.runtime,
        id: id.to_string(),
    };
    let (stdout, stderr) = create_and_start(setup, id);
    wait_until("the container to exit", Duration::from_secs(10), || {
        setup
            .runtime
            .state(id)
            .is_ok_and(|s| s.status == Status::Stopped)
    });
    setup.runtime.delete(id, false).unwrap();
    (
        std::fs::read_to_string(stdout).unwrap(),
        std::fs::read_to_string(stderr).unwrap(),
    )
}

#[test]
fn runtime_default_seccomp_is_enforced() {
    let binary = runc_binary();
    require(&binary);
    let setup = setup("seccomp", &binary);
    // Creating a user namespace needs no capability, so only seccomp can refuse it.
    let mut config = container_config(
        &[
            "sh",
            "-c",
            "unshare -U true && echo allowed || echo refused",
        ],
        false,
        0,
    );
    let (out, err) = run_to_exit(
        &setup,
        &format!("strake-test-{}-sc1", std::process::id()),
        &config,
    );
    assert_eq!(out, "refused\n", "RuntimeDefault; stderr: {err}");

    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
    }
    let (out, err) = run_to_exit(
        &setup,
        &format!("strake-test-{}-sc2", std::process::id()),
        &config,
    );
    assert_eq!(out, "allowed\n", "Unconfined; stderr: {err}");
}

#[test]
fn oom_kill_is_seen_in_the_container_cgroup() {
    let binary = runc_binary();
    require(&binary);
    let setup = setup("oom", &binary);
    let id = format!("strake-test-{}-oom", std::process::id());
    // tail keeps a newline-free stream in memory: 256 MiB against a 64 MiB limit.
    let config = container_config(
        &["sh", "-c", "head -c 268435456 /dev/zero | tail"],
        false,
        0,
    );
    let cgroups_path = write_bundle(&setup, &id, &config, &host_sandbox());
    let _guard = ContainerGuard {
        runtime: &setup.runtime,
        id: id.clone(),
    };
    let cgroup = setup
        .layout
        .container_cgroup(CgroupDriver::Cgroupfs, &cgroups_path);
    create_and_start(&setup, &id);
    wait_until(
        "the container to be OOM-killed",
        Duration::from_secs(30),
        || {
            setup
                .runtime
                .state(&id)
                .is_ok_and(|s| s.status == Status::Stopped)
        },
    );
    // The cgroup outlives its tasks until delete: that is when OOMKilled is decided.
    assert!(cgroup.oom_kills().unwrap().is_some_and(|n| n >= 1));
    setup.runtime.delete(&id, false).unwrap();
}

#[test]
fn privileged_container_gets_all_capabilities_and_host_devices() {
    let binary = runc_binary();
    require(&binary);
    let setup = setup("priv", &binary);
    let script = "grep CapEff /proc/self/status; [ -c /dev/kmsg ] && echo kmsg || echo no-kmsg";
    let mut config = container_config(&["sh", "-c", script], false, 0);
    let id = |n: &str| format!("strake-test-{}-{n}", std::process::id());

    let (out, err) = run_to_exit(&setup, &id("unpriv"), &config);
    // containerd's 14 default capabilities: bits 0,1,3,4,5,6,7,8,10,13,18,27,29,31.
    assert_eq!(out, "CapEff:\t00000000a80425fb\nno-kmsg\n", "stderr: {err}");

    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.privileged = true;
    }
    let (out, err) = run_to_exit(&setup, &id("priv"), &config);
    let host_bounding = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_string()))
        .unwrap();
    assert_eq!(
        out,
        format!("CapEff:\t{host_bounding}\nkmsg\n"),
        "stderr: {err}"
    );
}
