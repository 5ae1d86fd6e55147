//! A real systemd service manager for tests of the systemd cgroup driver, on a machine whose
//! PID 1 is not systemd.
//!
//! [`UserManager::start`] runs Debian's `systemd --user` (the same manager code the system
//! instance runs, D-Bus API included) in a cgroup of the test's own ([`CgroupParent`], in the
//! named `systemd` v1 hierarchy and in cgroup2), with a private `XDG_RUNTIME_DIR`. systemd
//! refuses to start unless the machine was booted with it (`/run/systemd/system` exists), so it
//! runs in a mount namespace of its own where a tmpfs over `/run/systemd` holds that directory:
//! nothing outside it sees a booted systemd. It manages units only below its own cgroup.
//! Dropping the guard stops it (SIGTERM, then SIGKILL), ends whatever is left in its cgroup and
//! removes the cgroup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cgroup::CgroupParent;
use crate::process::Daemon;
use crate::{Error, Result};

/// A `systemd --user` manager owned by one test.
#[derive(Debug)]
pub struct UserManager {
    daemon: Option<Daemon>,
    cgroup: CgroupParent,
    /// The manager's cgroup directories (named `systemd` hierarchy, cgroup2).
    dirs: Vec<PathBuf>,
    runtime_dir: tempfile::TempDir,
}

/// The manager's program (Debian's `systemd` package).
pub const SYSTEMD: &str = "/lib/systemd/systemd";

impl UserManager {
    /// Starts the manager and waits until its private socket answers.
    pub fn start() -> Result<Self> {
        if !Path::new(SYSTEMD).exists() {
            return Err(Error::MissingBinary {
                path: SYSTEMD.into(),
            });
        }
        let cgroup = CgroupParent::new();
        // The hierarchies systemd tracks its units in: the named v1 one and cgroup2.
        let dirs: Vec<PathBuf> = cgroup
            .locations()
            .into_iter()
            .filter(|d| {
                d.starts_with("/sys/fs/cgroup/systemd") || d.starts_with("/sys/fs/cgroup/unified")
            })
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(crate::io_err("create cgroup", d))?;
        }
        let runtime_dir = tempfile::Builder::new()
            .prefix("strake-systemd-")
            .tempdir()
            .map_err(crate::io_err("create", Path::new("/tmp")))?;
        let log = runtime_dir.path().join("systemd.log");
        let join: String = dirs
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
            .collect();
        let script = format!(
            "mount --make-rprivate / && mkdir -p /run/systemd && \
             mount -t tmpfs -o mode=755 strake-systemd /run/systemd && mkdir /run/systemd/system && \
             {join}exec {SYSTEMD} --user --log-target=console"
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--", "sh", "-c", &script])
            .env("XDG_RUNTIME_DIR", runtime_dir.path())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET");
        let daemon = Daemon::spawn("systemd --user", cmd, &log)?;
        let mut manager = UserManager {
            daemon: Some(daemon),
            cgroup,
            dirs,
            runtime_dir,
        };
        let socket = manager.private_socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(d) = manager.daemon.as_mut() {
                d.check_running()?;
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(manager);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "systemd --user".into(),
                    secs: 30,
                    last_error: format!("{} does not accept connections", socket.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The manager's private D-Bus socket (no bus daemon between).
    pub fn private_socket(&self) -> PathBuf {
        self.runtime_dir.path().join("systemd/private")
    }

    /// The D-Bus address of the manager's session bus (the `dbus-daemon` its `dbus.socket`
    /// starts on first use, from Debian's `dbus-user-session`), where it answers as
    /// `org.freedesktop.systemd1`.
    pub fn bus_address(&self) -> String {
        format!(
            "unix:path={}",
            self.runtime_dir.path().join("bus").display()
        )
    }

    /// The manager's cgroup, relative to the hierarchies' roots (`/strake-tb-<pid>-<n>`): its
    /// units' cgroups are below it.
    pub fn cgroup_path(&self) -> String {
        format!("/{}", self.cgroup.name())
    }

    /// Where the manager's cgroup is in each hierarchy, resolved against the test's own cgroup
    /// there (the v1 controllers' too, where the manager itself makes nothing).
    pub fn cgroup_locations(&self) -> Vec<PathBuf> {
        self.cgroup.locations()
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
        // Whatever the manager started and left behind (it stops its units on SIGTERM, not on
        // SIGKILL) is ours to end: by PID, from its own cgroup.
        for dir in &self.dirs {
            for pid in pids_below(dir) {
                // SAFETY: kill(2) with a PID read from a cgroup only our manager's children use.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dirs.iter().any(|d| !pids_below(d).is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The CgroupParent's drop removes the cgroups, deepest first.
    }
}

/// The processes in cgroup `dir` and below.
fn pids_below(dir: &Path) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            text.lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok()),
        );
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(pids_below(&e.path()));
            }
        }
    }
    out
}
