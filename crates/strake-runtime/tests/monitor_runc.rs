//! strake-monitor with the real runc: it creates the container, reports its PID, writes the
//! CRI log format from both streams, reopens the log on SIGUSR1, records the exit code durably,
//! and reports a failed create with runc's own message.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strake_integration::cgroup::CgroupParent;
use strake_runtime::monitor::{Args, ExitRecord, Ready};

struct Bundle {
    dir: tempfile::TempDir,
    id: String,
    // Removed (with what runc left below it) after the container is deleted.
    _cgroup: CgroupParent,
}

impl Bundle {
    fn new(id: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("bundle/rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
        for applet in ["sh", "echo", "sleep", "printf", "cat"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("symlink");
        }
        let out = Command::new("runc")
            .arg("spec")
            .current_dir(dir.path().join("bundle"))
            .output()
            .expect("runc spec");
        assert!(
            out.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.path().join("bundle/config.json");
        let mut spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read spec"))
                .expect("spec json");
        let cgroup = CgroupParent::new();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(args);
        spec["linux"]["cgroupsPath"] = format!("{}/{id}", cgroup.name()).into();
        std::fs::write(&path, spec.to_string()).expect("write spec");
        Bundle {
            dir,
            id: id.to_string(),
            _cgroup: cgroup,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn runc(&self, args: &[&str]) -> std::process::Output {
        Command::new("runc")
            .arg("--root")
            .arg(self.path("runc-root"))
            .args(args)
            .output()
            .expect("runc")
    }

    /// Starts the monitor as the runtime does: own session, report pipe on fd 3.
    fn monitor(&self) -> (std::process::Child, BufReader<std::fs::File>) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the array on success.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let args = Args {
            id: self.id.clone(),
            bundle: self.path("bundle"),
            runtime: "runc".into(),
            runtime_options: Vec::new(),
            runtime_root: self.path("runc-root"),
            systemd_cgroup: false,
            log_path: self.path("logs/0.log"),
            exit_file: self.path("exit.json"),
            pid_file: self.path("init.pid"),
            ready_fd: 3,
            stdin: false,
            stdin_once: false,
            tty: false,
            attach_socket: None,
            stdio_fifos: false,
        };
        let raw = w.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strake-monitor"));
        cmd.args(args.to_args());
        // SAFETY: setsid, dup2 and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let rc = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start monitor");
        drop(w);
        (child, BufReader::new(std::fs::File::from(r)))
    }

    fn wait_exit(&self) -> ExitRecord {
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(self.path("exit.json")) {
                return serde_json::from_str(&text).expect("exit record json");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no exit record");
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = self.runc(&["delete", "--force", &self.id]);
    }
}

fn read_ready(reader: &mut BufReader<std::fs::File>) -> Ready {
    let mut line = String::new();
    reader.read_line(&mut line).expect("ready line");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"))
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn monitor_logs_both_streams_and_records_the_exit_code() {
    let b = Bundle::new(
        "strake-mon-exit",
        &[
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; printf tail; exit 3",
        ],
    );
    let (mut child, mut ready) = b.monitor();
    let Ready::Created { pid } = read_ready(&mut ready) else {
        panic!("create failed")
    };
    assert!(pid > 1);
    let out = b.runc(&["start", &b.id]);
    assert!(
        out.status.success(),
        "runc start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exit = b.wait_exit();
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.signal, None);
    let status = child.wait().expect("monitor exits after the container");
    assert!(status.success(), "monitor: {status}");
    let lines = log_lines(&b.path("logs/0.log"));
    let tagged: Vec<String> = lines
        .iter()
        .map(|l| l.split_once(' ').map_or("", |x| x.1).to_string())
        .collect();
    assert!(tagged.contains(&"stdout F out".to_string()), "{lines:?}");
    assert!(tagged.contains(&"stderr F err".to_string()), "{lines:?}");
    assert!(tagged.contains(&"stdout P tail".to_string()), "{lines:?}");
    assert!(
        lines.iter().all(|l| l
            .split(' ')
            .next()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T'))),
        "{lines:?}"
    );
}

#[test]
fn monitor_reports_a_killed_container_as_128_plus_signal_and_reopens_its_log() {
    let b = Bundle::new(
        "strake-mon-kill",
        &["/bin/sh", "-c", "while :; do echo tick; sleep 0.1; done"],
    );
    let (mut child, mut ready) = b.monitor();
    assert!(matches!(read_ready(&mut ready), Ready::Created { .. }));
    assert!(b.runc(&["start", &b.id]).status.success());
    std::thread::sleep(Duration::from_millis(400));
    // Log rotation: move the file away, ask for a reopen, and the new file fills up.
    std::fs::rename(b.path("logs/0.log"), b.path("logs/0.log.1")).expect("rotate");
    // SAFETY: kill(2) on the monitor this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        log_lines(&b.path("logs/0.log"))
            .iter()
            .any(|l| l.ends_with("stdout F tick")),
        "no output after reopen"
    );
    assert!(!log_lines(&b.path("logs/0.log.1")).is_empty());
    assert!(b.runc(&["kill", &b.id, "KILL"]).status.success());
    let exit = b.wait_exit();
    assert_eq!((exit.exit_code, exit.signal), (137, Some(9)));
    assert!(child.wait().expect("monitor exits").success());
}

#[test]
fn monitor_reports_a_failed_create_with_the_runtime_message() {
    let b = Bundle::new("strake-mon-fail", &["/bin/no-such-program"]);
    let (mut child, mut ready) = b.monitor();
    match read_ready(&mut ready) {
        Ready::Failed { error } => assert!(error.contains("no-such-program"), "{error}"),
        other => panic!("create should fail, got {other:?}"),
    }
    let _ = child.wait();
    assert!(!b.path("exit.json").exists());
}
