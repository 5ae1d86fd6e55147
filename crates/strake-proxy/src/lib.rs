//! strake-proxy: a kube-proxy replacement.
//!
//! It watches Services and EndpointSlices and programs nftables (tables `ip strake-proxy` and
//! `ip6 strake-proxy`) so that ClusterIP, NodePort and LoadBalancer traffic reaches ready endpoints.
//!
//! Start reading at [`model::build`] (API objects -> validated model), then
//! [`nft::ruleset::Ruleset::build`] (model -> desired nftables state, a pure function), then
//! [`nft::sync::Syncer`] (desired versus last applied -> one nft transaction) and the [`nft::Nft`]
//! seam that runs the `nft` program.
//!
//! Status: the pure core and the data plane are in place and tested; the watch loop, health and
//! metrics servers are tracked in issue #4. Until they land, [`run`] refuses to start with an
//! error saying so, rather than pretending to serve.

pub mod config;
pub mod model;
pub mod nft;
#[cfg(test)]
mod testutil;

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
