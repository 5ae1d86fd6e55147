//! strake-runtime: a CRI v1 runtime.
//!
//! It serves the CRI RuntimeService and ImageService on a unix socket, pulls images from OCI
//! registries, builds pod sandboxes with CNI and runs containers through runc or another OCI runtime.
//!
//! Start reading at [`App`] (recover state, then serve), then [`server`] (RPC -> parts),
//! [`sandbox`] (namespaces, pause process, CNI via [`cni`]), [`image`], [`container`] (rootfs,
//! bundle from [`spec`], [`monitor`], lifecycle through [`runc`]), [`stats`] (cgroups,
//! writable layer, pod network) and [`metrics`] (the same readings as cAdvisor-style metrics).
//!
//! Version, Status, RuntimeConfig, the pod sandbox, container and image RPCs are served, with
//! container and pod stats ([`stats`]), pod metrics ([`metrics`]), UpdatePodSandboxResources
//! (recorded in the sandbox's configuration) and GetContainerEvents (fed by [`container`]'s
//! transitions and the exit watcher); Exec, Attach and PortForward hand out URLs of the
//! [`streaming`] server. The checkpoint RPCs answer `Unimplemented`, as containerd does
//! without CRIU.

pub use strake_types::cgroups;
pub mod cni;
pub mod config;
pub mod container;
pub mod image;
pub mod metrics;
pub mod monitor;
mod mount;
pub mod runc;
pub mod sandbox;
pub mod server;
pub mod spec;
pub mod state;
pub mod stats;
pub mod streaming;

use std::sync::Arc;

use strake_types::cri::image_service_server::ImageServiceServer;
use strake_types::cri::runtime_service_server::RuntimeServiceServer;

use crate::config::Config;
use crate::container::{ContainerMap, ContainerPaths, Containers};
use crate::image::ImageService;
use crate::sandbox::{SandboxPaths, Sandboxes};
use crate::server::{CgroupDriverKind, ImageServer, RuntimeServer};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// State could not be recovered.
    #[error("recover pod sandboxes")]
    Recover(#[source] sandbox::SandboxError),
    /// Containers could not be recovered.
    #[error("recover containers")]
    RecoverContainers(#[source] container::ContainerError),
    /// A recovery task died.
    #[error("recovery task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A state directory could not be created or its mode set.
    #[error("prepare state directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image store could not be opened.
    #[error("open the image store")]
    Images(#[source] image::ImageError),
    /// The socket could not be prepared or bound.
    #[error("listen on {path}")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The streaming server could not listen.
    #[error("start the streaming server")]
    Streaming(#[source] streaming::ListenError),
    /// The gRPC server failed.
    #[error("serve CRI")]
    Serve(#[source] tonic::transport::Error),
}

/// The runtime daemon: state recovered, ready to serve.
#[derive(Debug)]
pub struct App {
    config: Config,
    runtime: RuntimeServer,
    images: ImageServer,
    stopping: tokio::sync::watch::Sender<bool>,
}

impl App {
    /// Recovers images, sandboxes and containers from the state directory (before anything is
    /// served).
    pub async fn build(config: Config) -> Result<Self, Error> {
        let containers: ContainerMap = Default::default();
        let in_use = containers.clone();
        // The state roots: others may traverse them (as containerd's), the parts below that
        // hold layers, container roots and bundles are root's alone (0700), fixed on every
        // start for state an older version created 0755.
        for dir in [&config.state_dir, &config.run_dir] {
            state::create_dir_mode(dir, state::MODE_TRAVERSE).map_err(|source| {
                Error::StateDir {
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
        }
        let images = ImageService::open(
            config.state_dir.join("images"),
            config.pull_config(),
            move |image_id: &str| {
                in_use
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .any(|c| {
                        c.record.image_id == image_id
                            || c.record.volume_images.iter().any(|v| v == image_id)
                    })
            },
        )
        .await
        .map_err(Error::Images)?;
        let cni = cni::Cni::new(config.cni_conf_dir.clone(), config.cni_bin_dirs.clone());
        let sandboxes = Sandboxes::recover(
            SandboxPaths {
                state_dir: config.state_dir.join("sandboxes"),
                run_dir: config.run_dir.join("sandboxes"),
                pause_binary: config.pause_binary.clone(),
            },
            cni,
        )
        .map_err(Error::Recover)?;
        let driver = match config.cgroup_driver {
            CgroupDriverKind::Cgroupfs => cgroups::CgroupDriver::Cgroupfs,
            CgroupDriverKind::Systemd => cgroups::CgroupDriver::Systemd,
        };
        let container_paths = ContainerPaths {
            state_dir: config.state_dir.join("containers"),
            runtime_dir: config.run_dir.join("oci"),
            monitor_binary: sibling_binary(&config.pause_binary, "strake-monitor"),
        };
        let handlers = config.runtime_handlers.clone();
        let containers = tokio::task::spawn_blocking(move || {
            Containers::recover(container_paths, handlers, driver, containers)
        })
        .await
        .map_err(Error::Task)?
        .map_err(Error::RecoverContainers)?;
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let (sandboxes, containers) = (Arc::new(sandboxes), Arc::new(containers));
        let streaming = streaming::StreamServer::bind(
            &config.stream_server_address,
            config.stream_server_port,
            config.stream_idle_timeout,
            containers.clone(),
            sandboxes.clone(),
        )
        .map_err(Error::Streaming)?;
        let runtime = RuntimeServer {
            sandboxes,
            containers: containers.clone(),
            streaming: Arc::new(streaming),
            images: images.clone(),
            handlers: config.runtime_handlers.clone(),
            sandbox_image: config.sandbox_image.clone(),
            cgroup_driver: config.cgroup_driver,
            default_cgroup_parent: config.default_cgroup_parent.clone(),
            cpu_samples: Default::default(),
            stopping: stopping_rx,
        };
        Ok(App {
            config,
            runtime,
            images: ImageServer { images, containers },
            stopping,
        })
    }

    /// Serves CRI on the configured unix socket (mode 0660) until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config.listen.clone();
        let listen_err = |source| Error::Listen {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(listen_err)?;
        }
        // A socket file left by a previous run would make bind fail; nothing else may be there.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(&path).map_err(listen_err)?;
            }
            Ok(_) => {
                return Err(listen_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            Err(_) => {}
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(listen_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .map_err(listen_err)?;
        tracing::info!(socket = %path.display(), "serving CRI");
        // Units ordered after this one (the kubelet's) may start: the socket answers.
        strake_types::notify::ready();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let watcher = tokio::spawn(watch_exits(self.runtime.containers.clone()));
        let streaming = tokio::spawn(self.runtime.streaming.clone().serve());
        let stopping = self.stopping;
        let images = self.images.images.clone();
        let shutdown = async move {
            shutdown.await;
            // Pulls in flight would hold the graceful shutdown open (a slow registry, a long
            // unpack): they are cancelled and clean up after themselves.
            images.shutdown();
            // Ends the event streams, which would otherwise hold the graceful shutdown open.
            let _ = stopping.send(true);
        };
        let served = tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(self.runtime))
            .add_service(ImageServiceServer::new(self.images))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        watcher.abort();
        streaming.abort();
        served.map_err(Error::Serve)?;
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

/// How often the exit watcher looks for exits the monitors recorded.
const EXIT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The exit watcher: the monitors record exits in files (they outlive the daemon, so they cannot
/// call it), and this turns each new record into a container's Exited state and a STOPPED event
/// without waiting for a status call.
async fn watch_exits(containers: Arc<Containers>) {
    let mut tick = tokio::time::interval(EXIT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = containers.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || c.poll_exits()).await {
            tracing::warn!(error = %e, "exit watcher pass failed");
        }
    }
}

/// `strake-monitor` is installed next to `strake-pause` (and both next to the daemon).
fn sibling_binary(pause: &std::path::Path, name: &str) -> std::path::PathBuf {
    [
        pause.parent().map(|d| d.join(name)),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(name))),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
    .unwrap_or_else(|| std::path::PathBuf::from("/usr/local/bin").join(name))
}
