//! strake-kubelet: the Kubernetes node agent.
//!
//! It registers its Node, watches the pods bound to it and runs them through any CRI runtime
//! (strake-runtime, containerd, CRI-O), probing, restarting and reporting them like the kubelet.
//!
//! Start reading at [`App`], then [`heartbeat`] (registration, Lease, status), [`node`] (the
//! Node object as a pure function of [`machine`] facts, [`config`] and health) and [`runtime`]
//! (the CRI connection and its [`runtime::Cri`] seam). Pods: [`pods`] (the two pod sources)
//! hands each pod to a [`pod_worker`], which runs the pure core in [`sync`] and executes its
//! actions ([`lifecycle`] hooks, [`termination`] messages, [`prober`]).
//!
//! Status (issues #11, #12): node registration, Lease, node status and conditions, allocatable
//! after reservations and hard eviction thresholds ([`allocatable`]); pods bound to the node
//! and static pods (standalone or mirrored) run through CRI with init containers, sidecars,
//! probes, volumes (subPath opened inside the volume and bound by descriptor: [`subpath`]),
//! restart backoff, postStart/preStop hooks, termination messages, kubelet-managed
//! `/etc/hosts` ([`etc_hosts`]), sysctls ([`admission`], [`sysctls`]), DNS ([`dns`]), status
//! and graceful deletion; container log rotation ([`log_rotation`]); the HTTPS API on 10250
//! ([`server`]: logs, exec/attach/port-forward, stats, metrics). Not yet: QoS cgroups,
//! resource admission ([`predicates`] is the pure check, not yet called), eviction, image and
//! container GC.

pub mod admission;
pub mod allocatable;
pub mod api_client;
pub mod config;
pub mod credentials;
pub mod deadline;
pub mod dns;
pub mod etc_hosts;
pub mod events;
pub mod eviction;
pub mod healthz;
pub mod heartbeat;
pub mod image_gc;
pub mod lifecycle;
pub mod log_rotation;
pub mod machine;
pub mod node;
pub mod pleg;
pub mod pod_certificates;
pub mod pod_cgroups;
pub mod pod_spec;
pub mod pod_status;
pub mod pod_worker;
pub mod pods;
pub mod predicates;
pub mod prober;
pub mod relist;
pub mod resize;
pub mod resources;
pub mod runtime;
pub mod server;
pub mod services;
pub mod static_pods;
pub mod subpath;
pub mod sync;
pub mod sysctls;
pub mod termination;
pub mod trust_bundles;
pub mod volumes;

use std::time::Duration;

use crate::config::Config;
use crate::machine::MachineInfo;

/// Why the kubelet could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime endpoint is unusable.
    #[error("container runtime endpoint")]
    Runtime(#[source] runtime::RuntimeError),
    /// The kubeconfig could not be loaded.
    #[error("load kubeconfig {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The health endpoint could not be bound.
    #[error("bind healthz on {addr}")]
    Healthz {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS API (10250) could not start.
    #[error("kubelet API")]
    Server(#[source] server::ServerError),
    /// Neither an API server nor a static pod directory: nothing to do.
    #[error("give --kubeconfig, or --pod-manifest-path for standalone mode")]
    Standalone,
    /// A reservation named in `enforceNodeAllocatable` could not be enforced on its cgroup.
    #[error("enforce {what} on cgroup {cgroup}")]
    EnforceReserved {
        what: &'static str,
        cgroup: String,
        #[source]
        source: pod_cgroups::CgroupError,
    },
}

/// The kubelet: configuration, machine facts and the runtime connection.
#[derive(Debug)]
pub struct App {
    config: Config,
    machine: MachineInfo,
    runtime: runtime::Runtime,
}

async fn client(path: &std::path::Path, limits: api_client::Limits) -> Result<kube::Client, Error> {
    api_client::client(path, limits)
        .await
        .map_err(|source| Error::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
}

impl App {
    /// The QoS cgroups (`kubepods` held to the node's allocatable when `enforceNodeAllocatable`
    /// names `pods`), made at start; `None` with `cgroupsPerQOS: false` or where the host's
    /// hierarchies cannot be read.
    async fn pod_cgroups(&self) -> Result<Option<std::sync::Arc<pod_cgroups::PodCgroups>>, Error> {
        if !self.config.cgroups_per_qos {
            return Ok(None);
        }
        let cg = match pod_cgroups::PodCgroups::detect(
            self.config.cgroup_driver,
            &self.config.cgroup_root,
            self.config.pod_pids_limit,
        )
        .await
        {
            Ok(cg) => cg,
            Err(e) => {
                tracing::warn!(error = %e, driver = self.config.cgroup_driver.as_str(), "QoS cgroups not made");
                return Ok(None);
            }
        };
        let enforce = self
            .config
            .enforce_node_allocatable
            .iter()
            .any(|e| e == "pods");
        let reserved = |name: &str| {
            let r = &self.config.reservation;
            r.kube_reserved.get(name).copied().unwrap_or(0)
                + r.system_reserved.get(name).copied().unwrap_or(0)
        };
        let allocatable = enforce.then(|| {
            pod_cgroups::node_values(
                i128::from(self.machine.cpus) * 1000 - reserved("cpu"),
                (i128::from(self.machine.memory_bytes) * 1000 - reserved("memory")) / 1000,
            )
        });
        if let Err(e) = cg.ensure_node(allocatable).await {
            tracing::warn!(error = %e, "QoS cgroups not made; pods get no pod-level cgroup values");
            return Ok(None);
        }
        // The reservations named in enforceNodeAllocatable, on their existing cgroups.
        let r = &self.config.reservation;
        let reservations = [
            (
                "kube-reserved",
                &self.config.kube_reserved_cgroup,
                &r.kube_reserved,
            ),
            (
                "system-reserved",
                &self.config.system_reserved_cgroup,
                &r.system_reserved,
            ),
        ];
        for (what, cgroup, reserved) in reservations {
            let named = |e: &str| self.config.enforce_node_allocatable.iter().any(|x| x == e);
            let (full, compressible) = (named(what), named(&format!("{what}-compressible")));
            let Some(cgroup) = cgroup.as_deref().filter(|_| full || compressible) else {
                continue;
            };
            let values = pod_cgroups::reserved_values(reserved, !full);
            cg.enforce_existing(cgroup, &values)
                .await
                .map_err(|source| Error::EnforceReserved {
                    what,
                    cgroup: cgroup.to_string(),
                    source,
                })?;
            tracing::info!(what, cgroup, "reservation enforced");
        }
        Ok(Some(std::sync::Arc::new(cg)))
    }

    /// Reads the machine and prepares the runtime connection.
    pub fn build(config: Config) -> Result<Self, Error> {
        let runtime =
            runtime::Runtime::new(&config.container_runtime_endpoint, Duration::from_secs(2))
                .map_err(Error::Runtime)?;
        let machine = MachineInfo::read(&config.root_dir);
        Ok(App {
            config,
            machine,
            runtime,
        })
    }

    /// Registers the node and keeps its Lease and status up to date until `shutdown`.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        let healthz_addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.config.healthz_port));
        let listener = healthz::bind(healthz_addr)
            .await
            .map_err(|source| Error::Healthz {
                addr: healthz_addr,
                source,
            })?;
        tokio::spawn(healthz::serve(listener));
        // Without a kubeconfig the kubelet runs standalone: static pods only, nothing reported.
        // One client for everything; lease renewals are exempt from its rate limits.
        let client = match &self.config.kubeconfig {
            Some(kc) => Some(client(kc, self.config.api_limits).await?),
            None => None,
        };
        if client.is_none() && self.config.pod_manifest_path.is_none() {
            return Err(Error::Standalone);
        }
        // The node's pods are watched once: the pod source fills the store the API serves.
        let (pod_store, pod_writer) = kube::runtime::reflector::store();
        let server = server::Server::bind(
            &self.config,
            self.runtime.clone(),
            client.clone(),
            client.as_ref().map(|_| pod_store.clone()),
        )
        .await
        .map_err(Error::Server)?;
        tracing::info!(addr = ?server.local_addr().ok(), "kubelet API listening");
        strake_types::notify::ready();
        let server_task = tokio::spawn(server.serve());
        let work = async {
            let mut tasks = Vec::new();
            // The eviction manager's pressure conditions: for the node status and admission.
            let (pressure_tx, pressure) = tokio::sync::watch::channel(Default::default());
            if let Some(main_client) = &client {
                let node =
                    heartbeat::register(main_client.clone(), &self.config, &self.machine).await;
                tasks.push(tokio::spawn(heartbeat::lease_loop(
                    main_client.clone(),
                    node,
                    self.config.node_lease_duration,
                )));
                tasks.push(tokio::spawn(heartbeat::status_loop(
                    main_client.clone(),
                    self.runtime.clone(),
                    self.config.clone(),
                    self.machine.clone(),
                    pressure.clone(),
                )));
            }
            let runtime_name = loop {
                match self.runtime.health().await {
                    Ok(h) => break h.version.split("://").next().unwrap_or("cri").to_string(),
                    Err(e) => {
                        tracing::warn!(error = %e, "container runtime not reachable yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            let api = client.clone();
            let cri: std::sync::Arc<dyn runtime::Cri> = std::sync::Arc::new(self.runtime.clone());
            // The runtime's cgroup driver wins over the configured one (upstream's
            // KubeletCgroupDriverFromCRI): pod cgroups and the runtime must agree.
            match self.runtime.cgroup_driver().await {
                Ok(Some(driver)) => {
                    if driver != self.config.cgroup_driver {
                        tracing::info!(
                            configured = self.config.cgroup_driver.as_str(),
                            runtime = driver.as_str(),
                            "using the container runtime's cgroup driver"
                        );
                    }
                    self.config.cgroup_driver = driver;
                }
                Ok(None) => tracing::warn!(
                    driver = self.config.cgroup_driver.as_str(),
                    "the container runtime does not report its cgroup driver; using the configured one"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "RuntimeConfig failed; using the configured cgroup driver")
                }
            }
            let cgroups = self.pod_cgroups().await?;
            let ctx = pod_worker::Context {
                volumes: volumes::Volumes::new(&self.config.root_dir, api.clone())
                    .with_pod_certificates(&self.config.node_name),
                client: api.clone(),
                cri: cri.clone(),
                relist: std::sync::Arc::new(relist::Relist::new(cri.clone(), relist::PERIOD)),
                cgroups,
                config: self.config.clone(),
                host_ip: self
                    .config
                    .node_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                runtime_name,
                nudges: pleg::Nudges::default(),
                services: api.clone().map(services::Services::start),
                end_requests: pod_worker::EndRequests::default(),
                pressure,
                allocations: resize::Allocations::load(
                    &self.config.root_dir.join("allocated_pods_state"),
                ),
            };
            if let Some(main_client) = &client {
                tasks.push(tokio::spawn(eviction::run(
                    eviction::Inputs {
                        runtime: self.runtime.clone(),
                        client: main_client.clone(),
                        pods: pod_store.clone(),
                        config: self.config.clone(),
                        end_requests: ctx.end_requests.clone(),
                        nudges: ctx.nudges.clone(),
                        pressure: pressure_tx,
                    },
                    self.config.eviction.clone(),
                )));
            }
            tasks.push(tokio::spawn(image_gc::run(
                self.runtime.clone(),
                self.config.image_gc,
            )));
            tasks.push(tokio::spawn(log_rotation::run(
                self.runtime.clone(),
                self.config.log_rotation.clone(),
            )));
            tasks.push(tokio::spawn(pleg::run(
                self.runtime.clone(),
                ctx.nudges.clone(),
            )));
            let manifests = self
                .config
                .pod_manifest_path
                .clone()
                .map(|dir| (dir, self.config.file_check_frequency));
            let api = api.map(|c| (c, pod_writer));
            tasks.push(tokio::spawn(pods::run(ctx, api, manifests)));
            futures::future::join_all(tasks).await;
            Ok::<(), Error>(())
        };
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down; pods keep running"),
            result = work => result?,
        }
        server_task.abort();
        Ok(())
    }
}
