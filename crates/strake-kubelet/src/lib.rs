//! strake-kubelet: the Kubernetes node agent.
//!
//! It registers its Node, watches the pods bound to it and runs them through any CRI runtime
//! (strake-runtime, containerd, CRI-O), probing, restarting and reporting them like the kubelet.
//!
//! Status: the workspace, flags and logging are in place; the daemon's work is tracked in
//! issue #5. Until it lands, [`run`] refuses to start with an error saying so, rather
//! than pretending to serve.

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's serving loop is not built yet.
    #[error("strake-kubelet cannot serve yet: its implementation is tracked in issue #5")]
    NotBuilt,
}

/// Runs the daemon until it is told to stop.
pub fn run() -> Result<(), Error> {
    tracing::error!(issue = 5, "not built yet");
    Err(Error::NotBuilt)
}
