//! strake-runtime: a CRI v1 runtime.
//!
//! It serves the CRI RuntimeService and ImageService on a unix socket, pulls images from OCI
//! registries, builds pod sandboxes with CNI and runs containers through runc or another OCI runtime.
//!
//! Status: the workspace, flags and logging are in place; the daemon's work is tracked in
//! issue #3. Until it lands, [`run`] refuses to start with an error saying so, rather
//! than pretending to serve.

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's serving loop is not built yet.
    #[error("strake-runtime cannot serve yet: its implementation is tracked in issue #3")]
    NotBuilt,
}

/// Runs the daemon until it is told to stop.
pub fn run() -> Result<(), Error> {
    tracing::error!(issue = 3, "not built yet");
    Err(Error::NotBuilt)
}
