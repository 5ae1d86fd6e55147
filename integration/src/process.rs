//! Programs the test bed runs: checked one-shot commands and supervised daemons.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Runs `cmd` to completion with stdin closed; a non-zero exit becomes
/// [`Error::CommandFailed`] carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::CommandFailed {
            program,
            args,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A long-running program started by the test bed. Dropping it stops it: SIGTERM, then SIGKILL
/// after a grace period, always by its own PID.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `cmd` with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(crate::io_err("open log", log))?;
        let err = file.try_clone().map_err(crate::io_err("open log", log))?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn { program, source })?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails with the end of its log if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.poll_exit() {
            return Err(Error::DaemonExited {
                name: self.name.clone(),
                status,
                log_tail: self.log_tail(30),
            });
        }
        Ok(())
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after `grace`) and reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if self.poll_exit().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the PID of our own unreaped child, which cannot have been recycled.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.poll_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(name = %self.name, pid, "did not stop on SIGTERM; killing");
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
