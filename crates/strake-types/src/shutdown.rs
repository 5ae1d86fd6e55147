//! The daemons' stop signal: SIGTERM (systemd's `systemctl stop`, a DaemonSet pod's deletion)
//! or SIGINT (Ctrl-C).

/// Resolves when SIGTERM or SIGINT arrives. If SIGTERM cannot be watched (no signal handler
/// could be installed), only SIGINT stops the daemon, and the error is logged.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops this daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sigterm_resolves_it() {
        let waiter = tokio::spawn(super::signal());
        // Let the waiter install its handlers before the signal comes.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // SIGTERM to this test process, whose handler the waiter installed (tokio's handler
        // stays installed for the rest of the process, so nothing else here dies of it).
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("SIGTERM did not resolve the shutdown signal")
            .expect("waiter task");
    }
}
