//! The OCI runtime seam: [`Runc`] is everything strake asks of `runc` (or `crun`, or any binary
//! with runc's command line), and [`RuncCli`] is the only code that spawns that binary.
//!
//! Every command runs with stdin on `/dev/null`, an explicit environment (just `PATH` plus what
//! [`RuncConfig::env`] adds) and the global options `--root`, `--systemd-cgroup`, and
//! `--log <file> --log-format json`; a failure comes back as [`RuncError::CommandFailed`] with the
//! runtime's own error messages.
//!
//! `create` and `exec` are special: the runtime forks a `runc init` that inherits stdio and keeps it
//! open for the container's life, so their stdout/stderr are never pipes we read to the end
//! (`output()` would hang). They get the container's stdio fds from the caller ([`ProcessIo`]),
//! only the runtime process itself is waited for, and its errors are read from the `--log` file.
//!
//! The calls block; async callers use `spawn_blocking`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use oci_spec::runtime::{LinuxResources, Process};
use serde::Deserialize;

/// The most of a runtime's output (stdout, stderr or log) that is read: state and stats are
/// a few KiB, and a runtime gone wrong must not fill the daemon's memory.
const MAX_OUTPUT_BYTES: u64 = 4 << 20;

/// The `PATH` runtimes run with (they exec helpers such as `criu` or `newuidmap`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Failures of the OCI runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// The runtime ran and failed.
    #[error("{} {} failed ({status}): {stderr}", program.display(), args.join(" "))]
    CommandFailed {
        /// The runtime binary.
        program: PathBuf,
        /// Its arguments, global options included.
        args: Vec<String>,
        /// How it exited.
        status: ExitStatus,
        /// Its error output: stderr, and the error entries of its `--log` file.
        stderr: String,
    },
    /// The runtime could not be started.
    #[error("spawn {}", program.display())]
    Spawn {
        /// The runtime binary.
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A temporary file (log, process or resources JSON) could not be written or read.
    #[error("prepare files for {}", program.display())]
    TempFile {
        /// The runtime binary.
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime's output is not the JSON expected.
    #[error("parse the output of {} {}", program.display(), args.join(" "))]
    ParseOutput {
        /// The runtime binary.
        program: PathBuf,
        /// Its arguments.
        args: Vec<String>,
        #[source]
        source: serde_json::Error,
    },
}

/// How to run an OCI runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncConfig {
    /// The binary: `runc`, `/usr/bin/crun`, ...
    pub binary: PathBuf,
    /// `--root`: the runtime's state directory; `None` keeps the runtime's default.
    pub root: Option<PathBuf>,
    /// `--systemd-cgroup`: cgroupsPath is `slice:prefix:name` and systemd creates the scope.
    pub systemd_cgroup: bool,
    /// Where per-command log and JSON files are written (not inside `root`, which runtimes list).
    pub temp_dir: PathBuf,
    /// Environment variables besides `PATH`.
    pub env: Vec<(String, String)>,
    /// Runtime-specific global options, placed first (e.g. crun's `--cgroup-manager=disabled`,
    /// or the script when `binary` is an interpreter running a wrapper).
    pub global_args: Vec<String>,
}

impl RuncConfig {
    /// A runtime with its default state directory and cgroupfs.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        RuncConfig {
            binary: binary.into(),
            root: None,
            systemd_cgroup: false,
            temp_dir: std::env::temp_dir(),
            env: Vec::new(),
            global_args: Vec::new(),
        }
    }
}

/// The container's stdio: `None` is `/dev/null`.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Standard input.
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: Option<OwnedFd>,
    /// Standard error.
    pub stderr: Option<OwnedFd>,
}

/// Options of `create`.
#[derive(Debug, Default)]
pub struct CreateOptions {
    /// `--pid-file`: where the container's init PID is written.
    pub pid_file: Option<PathBuf>,
    /// `--console-socket`: for `terminal: true` specs, where the pty master is sent.
    pub console_socket: Option<PathBuf>,
    /// `--no-pivot`: for rootfs on ramfs, where pivot_root does not work.
    pub no_pivot: bool,
    /// The container's stdio.
    pub io: ProcessIo,
}

/// Options of `exec`.
#[derive(Debug, Default)]
pub struct ExecOptions {
    /// `--detach`: return once the process started instead of when it exits.
    pub detach: bool,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--console-socket`, for a process with `terminal: true`.
    pub console_socket: Option<PathBuf>,
    /// The process's stdio.
    pub io: ProcessIo,
}

/// A container's status as the OCI runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created.
    Creating,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused (frozen).
    Paused,
    /// Its init exited.
    Stopped,
    /// Anything else.
    #[serde(other)]
    Unknown,
}

/// `state` / `list` output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    /// Container ID.
    pub id: String,
    /// Init PID (0 once stopped).
    #[serde(default)]
    pub pid: i32,
    /// Status.
    pub status: Status,
    /// Bundle directory.
    #[serde(default)]
    pub bundle: PathBuf,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub created: String,
    /// The spec's annotations.
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

/// CPU usage from `events --stats`, nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CpuUsage {
    /// Total CPU time.
    pub total: u64,
    /// In kernel mode.
    pub kernel: u64,
    /// In user mode.
    pub user: u64,
}

/// CPU stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CpuStats {
    /// Usage.
    pub usage: CpuUsage,
}

/// One memory counter with its limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MemoryEntry {
    /// Current bytes.
    pub usage: u64,
    /// Limit in bytes.
    pub limit: u64,
    /// Peak bytes.
    pub max: u64,
}

/// Memory stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MemoryStats {
    /// Page cache bytes.
    pub cache: u64,
    /// Memory usage.
    pub usage: MemoryEntry,
    /// The raw `memory.stat` counters.
    pub raw: HashMap<String, u64>,
}

/// Pids stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PidsStats {
    /// Current number of tasks.
    pub current: u64,
    /// Limit (0 = none).
    pub limit: u64,
}

/// The part of `events --stats` strake uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// CPU.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// Pids.
    pub pids: PidsStats,
}

/// The OCI runtime's command line, as strake uses it.
pub trait Runc: Send + Sync {
    /// `create`: sets the container up from `bundle/config.json`, its init waiting for `start`.
    fn create(&self, id: &str, bundle: &Path, opts: CreateOptions) -> Result<(), RuncError>;
    /// `start`: runs the user process of a created container.
    fn start(&self, id: &str) -> Result<(), RuncError>;
    /// `start` with the container's stdio as the runtime's own: runsc hands the stdio of its
    /// `start`, not of `create`, to a container that joins an existing sandbox.
    fn start_with_io(&self, id: &str, io: ProcessIo) -> Result<(), RuncError>;
    /// `state`.
    fn state(&self, id: &str) -> Result<ContainerState, RuncError>;
    /// `kill [--all] id signal`.
    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuncError>;
    /// `delete [--force]`.
    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError>;
    /// `list --format json`.
    fn list(&self) -> Result<Vec<ContainerState>, RuncError>;
    /// `exec --process <json>`: the exit status of the process (or of the runtime, detached).
    fn exec(&self, id: &str, process: &Process, opts: ExecOptions)
    -> Result<ExitStatus, RuncError>;
    /// `update --resources <json>`.
    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuncError>;
    /// `events --stats`: one sample of the container's cgroup stats.
    fn stats(&self, id: &str) -> Result<Stats, RuncError>;
}

/// [`Runc`] by running the binary.
#[derive(Debug, Clone)]
pub struct RuncCli {
    config: RuncConfig,
}

/// The output of a command whose stdio we own.
struct Captured {
    stdout: Vec<u8>,
    args: Vec<String>,
}

impl RuncCli {
    /// A runtime client.
    pub fn new(config: RuncConfig) -> Self {
        RuncCli { config }
    }

    /// The configuration.
    pub fn config(&self) -> &RuncConfig {
        &self.config
    }

    fn program(&self) -> PathBuf {
        self.config.binary.clone()
    }

    fn temp_err(&self, source: std::io::Error) -> RuncError {
        RuncError::TempFile {
            program: self.program(),
            source,
        }
    }

    fn temp_file(&self, prefix: &str) -> Result<tempfile::NamedTempFile, RuncError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(&self.config.temp_dir)
            .map_err(|e| self.temp_err(e))
    }

    fn json_file(
        &self,
        prefix: &str,
        value: &impl serde::Serialize,
    ) -> Result<tempfile::NamedTempFile, RuncError> {
        let mut file = self.temp_file(prefix)?;
        serde_json::to_writer(file.as_file_mut(), value)
            .map_err(|e| self.temp_err(std::io::Error::other(e)))?;
        file.as_file_mut().flush().map_err(|e| self.temp_err(e))?;
        Ok(file)
    }

    /// The full argument list: global options, then the subcommand's.
    fn full_args(&self, log: &Path, args: &[OsString]) -> Vec<OsString> {
        let mut out: Vec<OsString> = self.config.global_args.iter().map(OsString::from).collect();
        if let Some(root) = &self.config.root {
            out.push("--root".into());
            out.push(root.into());
        }
        if self.config.systemd_cgroup {
            out.push("--systemd-cgroup".into());
        }

        out.push("--log".into());
        out.push(log.into());
        out.push("--log-format".into());
        out.push("json".into());
        out.extend(args.iter().cloned());
        out
    }

    fn command(&self, args: &[OsString]) -> Command {
        let mut cmd = Command::new(&self.config.binary);
        cmd.args(args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    fn failed(&self, args: Vec<String>, status: ExitStatus, stderr: String) -> RuncError {
        RuncError::CommandFailed {
            program: self.program(),
            args,
            status,
            stderr,
        }
    }

    /// Runs a command whose output is ours to read. Its stdout and stderr are files, not pipes,
    /// and only the runtime process is waited for: a helper the runtime leaves behind holds
    /// whatever stdio it inherited (runsc's `start` of a container in an existing sandbox
    /// starts that container's file server), and a pipe would not end until it exits.
    fn run(&self, args: &[OsString]) -> Result<Captured, RuncError> {
        let log = self.temp_file("runc-log-")?;
        let out = self.temp_file("runc-out-")?;
        let err = self.temp_file("runc-err-")?;
        let args = self.full_args(log.path(), args);
        let printable = printable(&args);
        tracing::debug!(runtime = %self.config.binary.display(), args = ?printable, "oci runtime");
        let (out_file, err_file) = (
            out.reopen().map_err(|e| self.temp_err(e))?,
            err.reopen().map_err(|e| self.temp_err(e))?,
        );
        let status = self
            .command(&args)
            .stdout(out_file)
            .stderr(err_file)
            .status()
            .map_err(|source| RuncError::Spawn {
                program: self.program(),
                source,
            })?;
        let read = |f: &tempfile::NamedTempFile| -> Result<Vec<u8>, RuncError> {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(
                    f.reopen().map_err(|e| self.temp_err(e))?,
                    MAX_OUTPUT_BYTES,
                ),
                &mut buf,
            )
            .map_err(|e| self.temp_err(e))?;
            Ok(buf)
        };
        if !status.success() {
            let mut message = String::from_utf8_lossy(&read(&err)?).trim().to_string();
            let logged = log_errors(&read(&log)?);
            if !logged.is_empty() && !message.contains(&logged) {
                if !message.is_empty() {
                    message.push_str("; ");
                }
                message.push_str(&logged);
            }
            return Err(self.failed(printable, status, message));
        }
        Ok(Captured {
            stdout: read(&out)?,
            args: printable,
        })
    }

    /// Runs a command that hands stdio to a container process and waits for the runtime only;
    /// returns its status, its printable arguments and the errors it logged.
    fn run_with_io(
        &self,
        args: &[OsString],
        io: ProcessIo,
    ) -> Result<(ExitStatus, Vec<String>, String), RuncError> {
        let log = self.temp_file("runc-log-")?;
        let args = self.full_args(log.path(), args);
        let printable = printable(&args);
        tracing::debug!(runtime = %self.config.binary.display(), args = ?printable, "oci runtime");
        let stdio = |fd: Option<OwnedFd>| fd.map_or_else(Stdio::null, Stdio::from);
        // A terminal as stdin (a streaming exec with a tty) becomes the runtime's controlling
        // terminal, in a session of its own: resizing the terminal then signals the runtime
        // (SIGWINCH), which resizes the process's own terminal.
        // SAFETY: isatty on a descriptor we own.
        let tty_stdin = io
            .stdin
            .as_ref()
            .is_some_and(|fd| unsafe { libc::isatty(fd.as_raw_fd()) } == 1);
        let mut cmd = self.command(&args);
        if tty_stdin {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the terminal by then.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(stdio(io.stdin))
            .stdout(stdio(io.stdout))
            .stderr(stdio(io.stderr));
        let child = cmd.spawn();
        // Close our copies of the fds so only the container holds them.
        drop(cmd);
        let status =
            child
                .and_then(|mut child| child.wait())
                .map_err(|source| RuncError::Spawn {
                    program: self.program(),
                    source,
                })?;
        let logged = log_errors(&std::fs::read(log.path()).unwrap_or_default());
        Ok((status, printable, logged))
    }

    /// runsc's `wait`: blocks until a started container exits, and returns its exit status
    /// (128 + the signal for a killed one). runc has no such command.
    pub fn wait(&self, id: &str) -> Result<i32, RuncError> {
        #[derive(Deserialize)]
        struct Waited {
            #[serde(rename = "exitStatus")]
            exit_status: i32,
        }
        let out = self.run(&[os("wait"), os(id)])?;
        self.parse::<Waited>(&out).map(|w| w.exit_status)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, out: &Captured) -> Result<T, RuncError> {
        serde_json::from_slice(&out.stdout).map_err(|source| RuncError::ParseOutput {
            program: self.program(),
            args: out.args.clone(),
            source,
        })
    }
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

fn printable(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// The messages of `error`/`fatal` entries of a JSON log (runc: `{"level","msg","time"}`; crun:
/// the same keys), or the raw text when it is not JSON.
fn log_errors(log: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        level: String,
        #[serde(default)]
        msg: String,
    }
    let text = String::from_utf8_lossy(log);
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Entry>(line) {
            Ok(e) if matches!(e.level.as_str(), "error" | "fatal" | "panic") => {
                messages.push(e.msg)
            }
            Ok(_) => {}
            Err(_) => messages.push(line.trim().to_string()),
        }
    }
    messages.join("; ")
}

impl Runc for RuncCli {
    fn create(&self, id: &str, bundle: &Path, opts: CreateOptions) -> Result<(), RuncError> {
        let mut args = vec![os("create"), os("--bundle"), os(bundle)];
        if let Some(p) = &opts.pid_file {
            args.extend([os("--pid-file"), os(p)]);
        }
        if let Some(p) = &opts.console_socket {
            args.extend([os("--console-socket"), os(p)]);
        }
        if opts.no_pivot {
            args.push(os("--no-pivot"));
        }
        args.push(os(id));
        let (status, args, logged) = self.run_with_io(&args, opts.io)?;
        if !status.success() {
            return Err(self.failed(args, status, logged));
        }
        Ok(())
    }

    fn start(&self, id: &str) -> Result<(), RuncError> {
        self.run(&[os("start"), os(id)]).map(|_| ())
    }

    fn start_with_io(&self, id: &str, io: ProcessIo) -> Result<(), RuncError> {
        let (status, args, logged) = self.run_with_io(&[os("start"), os(id)], io)?;
        if !status.success() {
            return Err(self.failed(args, status, logged));
        }
        Ok(())
    }

    fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let out = self.run(&[os("state"), os(id)])?;
        self.parse(&out)
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuncError> {
        let mut args = vec![os("kill")];
        if all {
            args.push(os("--all"));
        }
        args.extend([os(id), os(signal.to_string())]);
        self.run(&args).map(|_| ())
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut args = vec![os("delete")];
        if force {
            args.push(os("--force"));
        }
        args.push(os(id));
        self.run(&args).map(|_| ())
    }

    fn list(&self) -> Result<Vec<ContainerState>, RuncError> {
        let out = self.run(&[os("list"), os("--format"), os("json")])?;
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        // runc prints `null` when there are no containers.
        let list: Option<Vec<ContainerState>> = self.parse(&out)?;
        Ok(list.unwrap_or_default())
    }

    fn exec(
        &self,
        id: &str,
        process: &Process,
        opts: ExecOptions,
    ) -> Result<ExitStatus, RuncError> {
        let file = self.json_file("runc-process-", process)?;
        let mut args = vec![os("exec"), os("--process"), os(file.path())];
        if opts.detach {
            args.push(os("--detach"));
        }
        if let Some(p) = &opts.pid_file {
            args.extend([os("--pid-file"), os(p)]);
        }
        if let Some(p) = &opts.console_socket {
            args.extend([os("--console-socket"), os(p)]);
        }
        args.push(os(id));
        let (status, args, logged) = self.run_with_io(&args, opts.io)?;
        // A non-zero status is the process's own exit code unless the runtime logged an error.
        if !logged.is_empty() {
            return Err(self.failed(args, status, logged));
        }
        Ok(status)
    }

    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuncError> {
        let file = self.json_file("runc-resources-", resources)?;
        self.run(&[os("update"), os("--resources"), os(file.path()), os(id)])
            .map(|_| ())
    }

    fn stats(&self, id: &str) -> Result<Stats, RuncError> {
        #[derive(Deserialize)]
        struct Event {
            #[serde(default)]
            data: Stats,
        }
        let out = self.run(&[os("events"), os("--stats"), os(id)])?;
        let event: Event = self.parse(&out)?;
        Ok(event.data)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A fake OCI runtime, run as `sh -c FAKE fake-runc <args>` (no file to write, so nothing to
    /// clean and no ETXTBSY): records its arguments and environment in `$FAKE_DIR`, answers
    /// `state`, `list` and `events` with canned JSON, fails `start` the way runc does, and on
    /// `create` leaves a child holding its stdout, like `runc init`.
    const FAKE: &str = r#"#!/bin/sh
log=""; prev=""; cmd=""
for a in "$@"; do
  [ "$prev" = "--log" ] && log="$a"
  case "$a" in create|start|state|kill|delete|list|exec|update|events) [ -z "$cmd" ] && cmd="$a";; esac
  prev="$a"
done
echo "$*" >> "$FAKE_DIR/calls"
env | sort > "$FAKE_DIR/env"
case "$cmd" in
  state) sleep 4 & echo '{"ociVersion":"1.0.2","id":"c1","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2026-01-01T00:00:00Z","owner":""}';;
  list) echo null;;
  events) echo '{"type":"stats","id":"c1","data":{"cpu":{"usage":{"total":5,"kernel":2,"user":3}},"memory":{"usage":{"usage":100,"limit":200},"raw":{"rss":7}},"pids":{"current":3}}}';;
  create) sleep 4 & echo created-out; echo '{"level":"info","msg":"fine"}' > "$log";;
  start) echo '{"level":"error","msg":"container not created","time":"2026-01-01T00:00:00Z"}' > "$log"; echo "stderr text" >&2; exit 1;;
  exec) for a in "$@"; do [ "$p" = "--process" ] && cp "$a" "$FAKE_DIR/process.json"; p="$a"; done; echo exec-out; exit 3;;
  update) for a in "$@"; do [ "$p" = "--resources" ] && cp "$a" "$FAKE_DIR/resources.json"; p="$a"; done;;
esac
exit 0
"#;

    struct Fake {
        dir: tempfile::TempDir,
        runc: RuncCli,
    }

    impl Fake {
        fn new(systemd: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut global_args = vec!["-c".to_string(), FAKE.to_string(), "fake-runc".to_string()];
            if systemd {
                global_args.push("--debug".into());
            }
            let runc = RuncCli::new(RuncConfig {
                binary: PathBuf::from("/bin/sh"),
                root: Some(PathBuf::from("/run/strake-test-root")),
                systemd_cgroup: systemd,
                temp_dir: dir.path().to_path_buf(),
                env: vec![("FAKE_DIR".into(), dir.path().to_string_lossy().into_owned())],
                global_args,
            });
            Fake { dir, runc }
        }

        fn calls(&self) -> Vec<String> {
            let text = std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default();
            // The log file's name is random: show it as LOG.
            text.lines()
                .map(|l| {
                    l.split(' ')
                        .map(|w| if w.contains("runc-log-") { "LOG" } else { w })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        }
    }

    #[test]
    fn state_parses_json_with_global_options_first_and_a_clean_environment() {
        let fake = Fake::new(false);
        let state = fake.runc.state("c1").unwrap();
        assert_eq!(
            state,
            ContainerState {
                id: "c1".into(),
                pid: 42,
                status: Status::Running,
                bundle: "/b".into(),
                created: "2026-01-01T00:00:00Z".into(),
                annotations: None,
            }
        );
        assert_eq!(
            fake.calls(),
            ["--root /run/strake-test-root --log LOG --log-format json state c1"]
        );
        let env = std::fs::read_to_string(fake.dir.path().join("env")).unwrap();
        assert!(env.contains(&format!("PATH={DEFAULT_PATH}\n")));
        assert!(env.contains("FAKE_DIR="));
        assert!(!env.contains("HOME="), "the environment is explicit: {env}");
    }

    #[test]
    fn other_subcommands_build_runc_argument_lists() {
        let fake = Fake::new(true);
        fake.runc.kill("c1", 9, true).unwrap();
        fake.runc.kill("c1", 15, false).unwrap();
        fake.runc.delete("c1", true).unwrap();
        fake.runc.delete("c1", false).unwrap();
        assert!(
            fake.runc.list().unwrap().is_empty(),
            "runc prints null for none"
        );
        let g = "--debug --root /run/strake-test-root --systemd-cgroup --log LOG --log-format json";
        assert_eq!(
            fake.calls(),
            [
                format!("{g} kill --all c1 9"),
                format!("{g} kill c1 15"),
                format!("{g} delete --force c1"),
                format!("{g} delete c1"),
                format!("{g} list --format json"),
            ]
        );
    }

    #[test]
    fn failures_carry_stderr_and_the_logged_errors() {
        let fake = Fake::new(false);
        let err = fake.runc.start("c1").unwrap_err();
        let RuncError::CommandFailed {
            program,
            args,
            status,
            stderr,
        } = &err
        else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(program, Path::new("/bin/sh"));
        assert_eq!(args.last().map(String::as_str), Some("c1"));
        assert_eq!(status.code(), Some(1));
        assert_eq!(stderr, "stderr text; container not created");
        assert!(err.to_string().contains("start c1 failed"), "{err}");

        let missing = RuncCli::new(RuncConfig::new("/nonexistent/runc"));
        assert!(matches!(missing.start("c1"), Err(RuncError::Spawn { .. })));
    }

    #[test]
    fn commands_wait_for_the_runtime_only_not_for_helpers_it_leaves_behind() {
        // The fake's `state` leaves a `sleep 4` holding its stdout and stderr, as runsc's
        // `start` leaves a file server: the answer comes when the runtime exits.
        let fake = Fake::new(false);
        let started = Instant::now();
        let state = fake.runc.state("c1").unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "state waited for the runtime's helper"
        );
        assert_eq!(state.pid, 42);
    }

    #[test]
    fn create_waits_for_the_runtime_only_not_for_holders_of_its_stdio() {
        let fake = Fake::new(false);
        let out_path = fake.dir.path().join("stdout");
        let out = std::fs::File::create(&out_path).unwrap();
        let started = Instant::now();
        fake.runc
            .create(
                "c1",
                Path::new("/bundle"),
                CreateOptions {
                    pid_file: Some("/bundle/pid".into()),
                    io: ProcessIo {
                        stdout: Some(out.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "create hung on its stdio"
        );
        assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "created-out\n");
        assert_eq!(
            fake.calls(),
            [
                "--root /run/strake-test-root --log LOG --log-format json create --bundle /bundle --pid-file /bundle/pid c1"
            ]
        );
    }

    #[test]
    fn exec_passes_the_process_as_json_and_returns_its_exit_status() {
        let fake = Fake::new(false);
        let mut process = Process::default();
        process.set_args(Some(vec!["echo".into(), "hi".into()]));
        let (reader, writer) = std::io::pipe().unwrap();
        let status = fake
            .runc
            .exec(
                "c1",
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
        assert_eq!(status.code(), Some(3));
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { reader }, &mut out).unwrap();
        assert_eq!(out, "exec-out\n");
        let written: Process =
            serde_json::from_slice(&std::fs::read(fake.dir.path().join("process.json")).unwrap())
                .unwrap();
        assert_eq!(
            written.args().clone(),
            Some(vec!["echo".into(), "hi".into()])
        );
    }

    #[test]
    fn update_passes_resources_as_json_and_stats_parse_events() {
        let fake = Fake::new(false);
        let resources: LinuxResources =
            serde_json::from_value(serde_json::json!({"memory": {"limit": 1048576}})).unwrap();
        fake.runc.update("c1", &resources).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fake.dir.path().join("resources.json")).unwrap())
                .unwrap();
        assert_eq!(written["memory"]["limit"], 1048576);

        let stats = fake.runc.stats("c1").unwrap();
        assert_eq!(
            stats.cpu.usage,
            CpuUsage {
                total: 5,
                kernel: 2,
                user: 3
            }
        );
        assert_eq!(
            (stats.memory.usage.usage, stats.memory.usage.limit),
            (100, 200)
        );
        assert_eq!(stats.memory.raw["rss"], 7);
        assert_eq!(stats.pids.current, 3);
        // Only the runtime's temp files were created, and they are gone.
        let left: Vec<_> = std::fs::read_dir(fake.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("runc-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn log_errors_keeps_error_entries_and_raw_text() {
        let log = br#"{"level":"info","msg":"ok"}
{"level":"error","msg":"first"}
not json
{"level":"fatal","msg":"second"}
"#;
        assert_eq!(log_errors(log), "first; not json; second");
        assert_eq!(log_errors(b""), "");
    }
}
