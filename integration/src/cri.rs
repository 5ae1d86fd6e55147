//! What every CRI runtime guard of the test bed shares: running upstream's crictl against an
//! endpoint, and tearing a runtime down (pods first, through CRI, then the daemon by PID).

use std::process::{Command, Output};
use std::time::Duration;

use crate::{Result, paths, process};

/// Runs `crictl` against the CRI endpoint `endpoint` (`unix:///...`).
pub fn crictl(endpoint: &str, args: &[&str]) -> Result<Output> {
    process::run(
        Command::new(paths::cri_tools_bin("crictl")?)
            .args([
                "--runtime-endpoint",
                endpoint,
                "--image-endpoint",
                endpoint,
                "--timeout",
                "60s",
            ])
            .args(args),
    )
}

/// Removes every pod of the runtime at `endpoint` (so shims, monitors and containers end and
/// release their mounts), then stops the daemon `pid` with SIGTERM and waits for it.
pub fn shut_down(name: &str, pid: u32, endpoint: &str) {
    if !process::pid_alive(pid) {
        return;
    }
    if let Err(e) = crictl(endpoint, &["rmp", "--force", "--all"]) {
        tracing::warn!(runtime = name, error = %e, "cannot remove the runtime's pods");
    }
    // SAFETY: kill(2) on the PID of the daemon the calling guard started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    for _ in 0..100 {
        if !process::pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
