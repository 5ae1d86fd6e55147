//! strake-proxy: a kube-proxy replacement.
//!
//! It watches Services and EndpointSlices and programs nftables (tables `ip strake-proxy` and
//! `ip6 strake-proxy`) so that ClusterIP, NodePort and LoadBalancer traffic reaches ready endpoints.
//!
//! Status: the workspace, flags and logging are in place; the daemon's work is tracked in
//! issue #4. Until it lands, [`run`] refuses to start with an error saying so, rather
//! than pretending to serve.

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's serving loop is not built yet.
    #[error("strake-proxy cannot serve yet: its implementation is tracked in issue #4")]
    NotBuilt,
}

/// Runs the daemon until it is told to stop.
pub fn run() -> Result<(), Error> {
    tracing::error!(issue = 4, "not built yet");
    Err(Error::NotBuilt)
}
