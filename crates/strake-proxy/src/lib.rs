//! strake-proxy: a kube-proxy replacement.
//!
//! It watches Services and EndpointSlices and programs nftables (tables `ip strake-proxy` and
//! `ip6 strake-proxy`) so that ClusterIP, NodePort and LoadBalancer traffic reaches ready endpoints.
//!
//! Start reading at [`App`] (flags -> running daemon), then [`sync_loop`] (watchers and the sync
//! loop), [`model::ServiceObject`] and [`model::SliceObject`] (what the watches keep of each
//! API object), [`programmer::Programmer`] (the changed objects -> the model -> the rules
//! claimed per service port in [`nft::ruleset::Rules`] -> one transaction of their difference,
//! or a full one) and the [`nft::Nft`] seam that takes it to the kernel ([`nft::netlink`] by
//! default, or the `nft` program); [`model::build`] and [`nft::ruleset::Ruleset::build`] are
//! the same steps from scratch, for tests and benchmarks;
//! [`conntrack`] then deletes the UDP flows the new rules no longer produce.
//! [`server`] answers `/healthz`, `/livez`, `/metrics` and `/proxyMode` on its own thread, where
//! [`healthcheck`] also serves the health-check node ports of `externalTrafficPolicy: Local`.

pub mod config;
pub mod conntrack;
pub mod health;
pub mod healthcheck;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod programmer;
pub mod server;
pub mod sync_loop;
#[cfg(test)]
mod testutil;

use std::future::Future;
use std::sync::Arc;

use crate::config::DaemonConfig;
use crate::conntrack::{Conntrack, ConntrackCommand};
use crate::health::Health;
use crate::healthcheck::HealthCheckPorts;
use crate::metrics::Metrics;
use crate::nft::{Nft, NftError};
use crate::server::{ServerHandle, Shared};
use crate::sync_loop::{Kernel, Tracker, WarningReporter};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client could be built from the kubeconfig.
    #[error("build a Kubernetes client (kubeconfig {kubeconfig:?})")]
    Client {
        /// The kubeconfig used, if one was named.
        kubeconfig: Option<std::path::PathBuf>,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The health or metrics address could not be bound.
    #[error("serve health on {health} and metrics on {metrics}")]
    Serve {
        /// `--healthz-bind-address`.
        health: std::net::SocketAddr,
        /// `--metrics-bind-address`.
        metrics: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--cleanup` could not remove the tables.
    #[error("remove the proxy's nftables tables")]
    Cleanup {
        /// Why.
        #[source]
        source: NftError,
    },
}

/// The daemon, built and ready to run.
pub struct App {
    config: DaemonConfig,
    client: kube::Client,
    nft: Arc<dyn Nft>,
    conntrack: Arc<dyn Conntrack>,
    shared: Shared,
    servers: ServerHandle,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds the API client and starts the health and metrics servers.
    pub async fn build(config: DaemonConfig) -> Result<Self, Error> {
        let nft = crate::nft::backend(config.nft_backend);
        Self::build_with(config, nft).await
    }

    /// Like [`App::build`], with another [`Nft`].
    pub async fn build_with(config: DaemonConfig, nft: Arc<dyn Nft>) -> Result<Self, Error> {
        let client = client(&config).await?;
        let shared = Shared {
            health: Arc::new(Health::new(2 * config.sync_period)),
            metrics: Arc::new(Metrics::default()),
        };
        // Nothing is programmed yet: unhealthy if the first sync does not come in time.
        shared.health.queued(tokio::time::Instant::now());
        let servers = server::start(
            config.healthz_bind_address,
            config.metrics_bind_address,
            shared.clone(),
        )
        .map_err(|source| Error::Serve {
            health: config.healthz_bind_address,
            metrics: config.metrics_bind_address,
            source,
        })?;
        tracing::info!(
            node = %config.proxy.node_name,
            healthz = %servers.health_addr,
            metrics = %servers.metrics_addr,
            "strake-proxy started"
        );
        Ok(App {
            config,
            client,
            nft,
            conntrack: Arc::new(ConntrackCommand::new()),
            shared,
            servers,
        })
    }

    /// Uses another [`Conntrack`] for the stale UDP flow cleanup.
    pub fn with_conntrack(mut self, conntrack: Arc<dyn Conntrack>) -> Self {
        self.conntrack = conntrack;
        self
    }

    /// Where the health server listens (useful with port 0).
    pub fn health_addr(&self) -> std::net::SocketAddr {
        self.servers.health_addr
    }

    /// Where the metrics server listens.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.servers.metrics_addr
    }

    /// Watches and syncs until `shutdown` completes. Rules stay in place on exit, as with
    /// kube-proxy: traffic keeps flowing across a restart.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let tracker = Arc::new(Tracker::new(
            self.shared.health.clone(),
            self.shared.metrics.clone(),
        ));
        let (stores, tasks) =
            sync_loop::watch(&self.client, &self.config.proxy.node_name, &tracker);
        let warnings =
            WarningReporter::new(Some(self.client.clone()), &self.config.proxy.node_name);
        let health_checks =
            HealthCheckPorts::new(self.servers.runtime(), self.shared.health.clone());
        sync_loop::run(
            &self.config,
            stores,
            tracker,
            Kernel {
                nft: self.nft.clone(),
                conntrack: self.conntrack.clone(),
            },
            warnings,
            Some(health_checks),
            shutdown,
        )
        .await;
        for task in tasks {
            task.abort();
        }
        tracing::info!("strake-proxy stopped");
        Ok(())
    }
}

/// Removes the proxy's own nftables tables (`--cleanup`); no API server needed.
pub fn cleanup(nft: &dyn Nft) -> Result<(), Error> {
    nft::transaction::cleanup(nft).map_err(|source| Error::Cleanup { source })?;
    tracing::info!("removed tables ip/ip6 {}", nft::TABLE);
    Ok(())
}

async fn client(config: &DaemonConfig) -> Result<kube::Client, Error> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Client {
        kubeconfig: config.kubeconfig.clone(),
        source,
    };
    let kube_config = strake_types::kube_client::config(config.kubeconfig.as_deref())
        .await
        .map_err(|e| err(Box::new(e)))?;
    kube::Client::try_from(kube_config).map_err(|e| err(Box::new(e)))
}
