//! The CRI gRPC server: maps `runtime.v1` RPCs onto the runtime's parts and their errors onto
//! gRPC codes.
//!
//! Blocking work (namespaces, mounts, CNI plugins) runs on tokio's blocking pool so the server
//! keeps answering. RPCs whose subsystem is not built yet answer `Unimplemented` naming the
//! issue that tracks them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use strake_types::cri;
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status};

use crate::container::{Container, ContainerError, Containers, ImageFacts, ImageVolume};
use crate::image::{ErrorCode, ImageError, ImageService};
use crate::sandbox::{Sandbox, SandboxError, Sandboxes};
use crate::spec::ImageProcessConfig;
use crate::stats::{CpuSampler, POD_SAMPLE_PREFIX, container_stats, pod_stats};
use crate::streaming::{Pending, StreamServer};

/// The name the runtime reports in Version.
pub const RUNTIME_NAME: &str = "strake";
/// The handler used when a pod names none (`""` in CRI).
pub const DEFAULT_HANDLER: &str = "runc";
/// Items per message of the streaming list RPCs.
const STREAM_CHUNK: usize = 512;

type ResponseStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Which cgroup driver the runtime (and so the kubelet) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriverKind {
    /// Paths in the cgroup filesystem (containerd's default).
    Cgroupfs,
    /// systemd slices and scopes.
    Systemd,
}

/// The RuntimeService implementation.
#[derive(Clone, Debug)]
pub struct RuntimeServer {
    /// Pod sandboxes.
    pub sandboxes: Arc<Sandboxes>,
    /// Containers.
    pub containers: Arc<Containers>,
    /// Images, for CreateContainer.
    pub images: ImageService,
    /// OCI runtimes by RuntimeClass handler name.
    pub handlers: BTreeMap<String, crate::config::RuntimeHandler>,
    /// The image of infra containers.
    pub sandbox_image: String,
    /// The cgroup driver reported by RuntimeConfig.
    pub cgroup_driver: CgroupDriverKind,
    /// cgroup parent of sandboxes whose request names none (empty: the driver's default).
    pub default_cgroup_parent: String,
    /// Previous CPU readings, for the stats' `usage_nano_cores`.
    pub cpu_samples: Arc<CpuSampler>,
    /// Turns true when the daemon shuts down: open GetContainerEvents streams end then, or the
    /// server's graceful shutdown would wait for them forever.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The streaming server that Exec, Attach and PortForward hand URLs of.
    pub streaming: Arc<StreamServer>,
}

/// The optional RPCs strake-runtime does not serve (checkpoint and restore, which containerd
/// serves only with CRIU): the kubelet treats `Unimplemented` from them as "not supported".
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("strake-runtime does not implement {rpc}"))
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The gRPC status for a sandbox error.
pub fn status_of(e: SandboxError) -> Status {
    let msg = error_chain(&e);
    match e {
        SandboxError::InvalidArgument(_) | SandboxError::Unsupported { .. } => {
            Status::invalid_argument(msg)
        }
        SandboxError::NotFound(_) => Status::not_found(msg),
        SandboxError::NameTaken { .. } => Status::already_exists(msg),
        SandboxError::Network { .. } | SandboxError::Teardown { .. } => Status::unavailable(msg),
        SandboxError::Create { .. } | SandboxError::State { .. } => Status::internal(msg),
    }
}

/// The gRPC status for a container error.
pub fn container_status_of(e: ContainerError) -> Status {
    let msg = error_chain(&e);
    match e {
        ContainerError::InvalidArgument(_) => Status::invalid_argument(msg),
        ContainerError::Spec { ref source, .. } => match source {
            crate::spec::SpecError::ReadUserDatabase { .. }
            | crate::spec::SpecError::LoadSeccompProfile { .. }
            | crate::spec::SpecError::ReadMountinfo { .. }
            | crate::spec::SpecError::StatDevice { .. } => Status::internal(msg),
            _ => Status::invalid_argument(msg),
        },
        ContainerError::NotFound(_)
        | ContainerError::SandboxNotFound(_)
        | ContainerError::ImageNotFound(_) => Status::not_found(msg),
        ContainerError::NameTaken { .. } => Status::already_exists(msg),
        ContainerError::WrongState { .. } | ContainerError::SandboxNotReady(_) => {
            Status::failed_precondition(msg)
        }
        ContainerError::ExecTimeout { .. } => Status::deadline_exceeded(msg),
        ContainerError::Create { .. }
        | ContainerError::Runtime { .. }
        | ContainerError::Teardown { .. }
        | ContainerError::State { .. } => Status::internal(msg),
    }
}

/// The gRPC status for an image error.
pub fn image_status_of(e: ImageError) -> Status {
    let msg = error_chain(&e);
    match e.code() {
        ErrorCode::InvalidArgument => Status::invalid_argument(msg),
        ErrorCode::NotFound => Status::not_found(msg),
        ErrorCode::PermissionDenied => Status::permission_denied(msg),
        ErrorCode::FailedPrecondition => Status::failed_precondition(msg),
        ErrorCode::Unavailable => Status::unavailable(msg),
        ErrorCode::Internal => Status::internal(msg),
    }
}

/// `error: cause: cause`, the whole chain for the kubelet's event messages.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(status_of)
}

async fn blocking_container<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ContainerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(container_status_of)
}

fn container_item(c: &Container) -> cri::Container {
    cri::Container {
        id: c.record.id.clone(),
        pod_sandbox_id: c.record.sandbox_id.clone(),
        metadata: c.config.metadata.clone(),
        image: c.config.image.clone(),
        image_ref: c.record.image_ref.clone(),
        state: c.state() as i32,
        created_at: c.record.created_at_ns,
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        image_id: c.record.image_id.clone(),
    }
}

fn container_status(c: &Container) -> cri::ContainerStatus {
    let exit = c.record.exit.clone();
    cri::ContainerStatus {
        id: c.record.id.clone(),
        metadata: c.config.metadata.clone(),
        state: c.state() as i32,
        created_at: c.record.created_at_ns,
        started_at: c.record.started_at_ns,
        finished_at: exit.as_ref().map_or(0, |e| e.finished_at_ns),
        exit_code: exit.as_ref().map_or(0, |e| e.exit_code),
        image: c.config.image.clone(),
        image_ref: c.record.image_ref.clone(),
        reason: exit.as_ref().map(|e| e.reason.clone()).unwrap_or_default(),
        message: exit.map(|e| e.message).unwrap_or_default(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        mounts: c.config.mounts.clone(),
        log_path: c.record.log_path.display().to_string(),
        resources: c
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                windows: None,
            }),
        image_id: c.record.image_id.clone(),
        user: None,
        stop_signal: 0,
    }
}

fn container_matches(c: &Container, filter: Option<&cri::ContainerFilter>) -> bool {
    let Some(f) = filter else { return true };
    if !f.id.is_empty() && !c.record.id.starts_with(&f.id) {
        return false;
    }
    if !f.pod_sandbox_id.is_empty() && !c.record.sandbox_id.starts_with(&f.pod_sandbox_id) {
        return false;
    }
    if f.state
        .as_ref()
        .is_some_and(|st| st.state != c.state() as i32)
    {
        return false;
    }
    f.label_selector
        .iter()
        .all(|(k, v)| c.config.labels.get(k) == Some(v))
}

fn sandbox_state(sb: &Sandbox) -> i32 {
    if sb.record.ready {
        cri::PodSandboxState::SandboxReady as i32
    } else {
        cri::PodSandboxState::SandboxNotready as i32
    }
}

fn sandbox_item(sb: &Sandbox) -> cri::PodSandbox {
    cri::PodSandbox {
        id: sb.record.id.clone(),
        metadata: sb.config.metadata.clone(),
        state: sandbox_state(sb),
        created_at: sb.record.created_at_ns,
        labels: sb.config.labels.clone(),
        annotations: sb.config.annotations.clone(),
        runtime_handler: handler_name(&sb.record.runtime_handler),
    }
}

fn handler_name(h: &str) -> String {
    if h == DEFAULT_HANDLER {
        String::new()
    } else {
        h.to_string()
    }
}

fn sandbox_status(sb: &Sandbox) -> cri::PodSandboxStatus {
    let mut ips = sb.record.ips.iter().map(ToString::to_string);
    let network = cri::PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
    };
    let options = sb
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    cri::PodSandboxStatus {
        id: sb.record.id.clone(),
        metadata: sb.config.metadata.clone(),
        state: sandbox_state(sb),
        created_at: sb.record.created_at_ns,
        network: Some(network),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace { options }),
        }),
        labels: sb.config.labels.clone(),
        annotations: sb.config.annotations.clone(),
        runtime_handler: handler_name(&sb.record.runtime_handler),
    }
}

fn container_stats_matches(c: &Container, filter: Option<&cri::ContainerStatsFilter>) -> bool {
    container_matches(
        c,
        filter
            .map(|f| cri::ContainerFilter {
                id: f.id.clone(),
                pod_sandbox_id: f.pod_sandbox_id.clone(),
                label_selector: f.label_selector.clone(),
                state: None,
            })
            .as_ref(),
    )
}

fn pod_stats_matches(sb: &Sandbox, filter: Option<&cri::PodSandboxStatsFilter>) -> bool {
    matches_filter(
        sb,
        filter
            .map(|f| cri::PodSandboxFilter {
                id: f.id.clone(),
                label_selector: f.label_selector.clone(),
                state: None,
            })
            .as_ref(),
    )
}

/// The statuses of a pod's containers, as PodSandboxStatus and container events carry them.
fn containers_statuses(containers: &Containers, sandbox_id: &str) -> Vec<cri::ContainerStatus> {
    containers
        .of_sandbox(sandbox_id)
        .iter()
        .filter_map(|id| containers.get(id).ok())
        .map(|c| container_status(&c))
        .collect()
}

fn event_response(
    containers: &Containers,
    sandboxes: &Sandboxes,
    e: crate::container::ContainerEvent,
) -> cri::ContainerEventResponse {
    let c = &e.container;
    let (id, sandbox_id) = (&c.record.id, &c.record.sandbox_id);
    // The others as they are now; this one as the transition left it (and gone once deleted).
    let mut statuses: Vec<cri::ContainerStatus> = containers_statuses(containers, sandbox_id)
        .into_iter()
        .filter(|s| &s.id != id)
        .collect();
    if e.kind != cri::ContainerEventType::ContainerDeletedEvent {
        statuses.push(container_status(c));
    }
    cri::ContainerEventResponse {
        pod_sandbox_status: sandboxes.get(sandbox_id).ok().map(|sb| sandbox_status(&sb)),
        containers_statuses: statuses,
        container_id: id.clone(),
        container_event_type: e.kind as i32,
        created_at: e.at_ns,
    }
}

/// Upstream's checks of an exec or attach request.
fn check_stdio(
    container_id: &str,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), Status> {
    if container_id.is_empty() {
        return Err(Status::invalid_argument("missing required container_id"));
    }
    if tty && stderr {
        // A terminal has one output: stderr cannot be told apart.
        return Err(Status::invalid_argument(
            "tty and stderr cannot both be true",
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(Status::invalid_argument(
            "one of stdin, stdout, or stderr must be set",
        ));
    }
    Ok(())
}

impl RuntimeServer {
    /// The full ID of a running container (NotFound, FailedPrecondition otherwise).
    fn running_container(&self, id: &str, op: &'static str) -> Result<String, Status> {
        let c = self.containers.get(id).map_err(container_status_of)?;
        let state = c.state();
        if state != cri::ContainerState::ContainerRunning {
            return Err(Status::failed_precondition(format!(
                "container {} is not running ({state:?}): cannot {op} it",
                c.record.id
            )));
        }
        Ok(c.record.id)
    }

    /// Parks a streaming request; its URL.
    fn park(&self, req: Pending) -> Result<String, Status> {
        self.streaming
            .url_for(req)
            .map_err(|e| Status::resource_exhausted(e.to_string()))
    }

    /// ListContainerStats and StreamContainerStats.
    async fn all_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>, Status> {
        self.forget_stale_samples();
        let (containers, samples) = (self.containers.clone(), self.cpu_samples.clone());
        blocking_container(move || {
            let timestamp = now_ns();
            Ok(containers
                .list()
                .iter()
                .filter(|c| container_stats_matches(c, filter.as_ref()))
                .map(|c| container_stats(&containers, &samples, c, timestamp))
                .collect())
        })
        .await
    }

    /// ListPodSandboxStats and StreamPodSandboxStats.
    async fn all_pod_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>, Status> {
        self.forget_stale_samples();
        let pods: Vec<Sandbox> = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|sb| pod_stats_matches(sb, filter.as_ref()))
            .collect();
        let (containers, samples) = (self.containers.clone(), self.cpu_samples.clone());
        blocking_container(move || {
            let timestamp = now_ns();
            Ok(pods
                .iter()
                .map(|sb| pod_stats(&containers, &samples, sb, timestamp))
                .collect())
        })
        .await
    }

    /// ListPodSandboxMetrics and StreamPodSandboxMetrics: the ready pods', as containerd
    /// reports them (a stopped pod has no cgroup or network left to read).
    async fn all_pod_metrics(&self) -> Result<Vec<cri::PodSandboxMetrics>, Status> {
        let pods: Vec<Sandbox> = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|sb| sb.record.ready)
            .collect();
        let containers = self.containers.clone();
        blocking_container(move || {
            let timestamp = now_ns();
            Ok(pods
                .iter()
                .map(|sb| crate::metrics::pod_metrics(&containers, sb, timestamp))
                .collect())
        })
        .await
    }

    /// Drops CPU readings of containers and pods that are gone.
    fn forget_stale_samples(&self) {
        self.cpu_samples
            .retain(|k| match k.strip_prefix(POD_SAMPLE_PREFIX) {
                Some(pod) => self.sandboxes.get(pod).is_ok(),
                None => self.containers.resolve(k).is_ok(),
            });
    }
}

/// The pod-level resources of a sandbox's configuration (as RunPodSandbox or the latest
/// UpdatePodSandboxResources gave them), for verbose PodSandboxStatus.
fn pod_resources_json(config: &cri::PodSandboxConfig) -> String {
    let one = |r: Option<&cri::LinuxContainerResources>| {
        r.map_or(serde_json::Value::Null, |r| {
            serde_json::json!({
                "cpuPeriod": r.cpu_period,
                "cpuQuota": r.cpu_quota,
                "cpuShares": r.cpu_shares,
                "memoryLimitInBytes": r.memory_limit_in_bytes,
                "cpusetCpus": r.cpuset_cpus,
                "cpusetMems": r.cpuset_mems,
                "unified": r.unified,
            })
        })
    };
    let linux = config.linux.as_ref();
    serde_json::json!({
        "overhead": one(linux.and_then(|l| l.overhead.as_ref())),
        "resources": one(linux.and_then(|l| l.resources.as_ref())),
    })
    .to_string()
}

fn matches_filter(sb: &Sandbox, filter: Option<&cri::PodSandboxFilter>) -> bool {
    let Some(f) = filter else { return true };
    if !f.id.is_empty() && !sb.record.id.starts_with(&f.id) {
        return false;
    }
    if f.state
        .as_ref()
        .is_some_and(|st| st.state != sandbox_state(sb))
    {
        return false;
    }
    f.label_selector
        .iter()
        .all(|(k, v)| sb.config.labels.get(k) == Some(v))
}

/// The metadata name of infra containers (the kubelet's and cAdvisor's name for them; no
/// container of a pod can have it, as Kubernetes names are lower case).
const INFRA_CONTAINER_NAME: &str = "POD";

impl RuntimeServer {
    /// A sandbox as the kubelet sees it: not ready once its infra container (if it has one)
    /// has exited, since with gVisor the pod's sandbox died with it and no container of the
    /// pod can start again; the kubelet then makes a new sandbox.
    fn with_infra_state(&self, mut sb: Sandbox) -> Sandbox {
        if sb.record.ready
            && let Some(infra) = self.containers.infra_of(&sb.record.id)
            && self
                .containers
                .get(&infra)
                .is_ok_and(|c| c.state() == cri::ContainerState::ContainerExited)
        {
            sb.record.ready = false;
        }
        sb
    }

    /// Every sandbox, as [`Self::with_infra_state`] shows it.
    fn sandboxes_now(&self) -> Vec<Sandbox> {
        self.sandboxes
            .list()
            .into_iter()
            .map(|sb| self.with_infra_state(sb))
            .collect()
    }

    /// Stops and removes a sandbox whose creation failed after it was made, its infra
    /// container included (best effort: the caller reports the first failure).
    async fn discard_sandbox(&self, id: &str) {
        let containers = self.containers.clone();
        let sandbox_id = id.to_string();
        let _ = blocking_container(move || {
            if let Some(infra) = containers.infra_of(&sandbox_id) {
                let _ = containers.stop(&infra, std::time::Duration::ZERO);
                containers.remove(&infra)?;
            }
            Ok(())
        })
        .await;
        let (sandboxes, id) = (self.sandboxes.clone(), id.to_string());
        let _ = blocking(move || {
            sandboxes.stop(&id)?;
            sandboxes.remove(&id)
        })
        .await;
    }

    /// CreateContainer's work, also for infra containers: the image and the image volumes are
    /// reserved until the container is registered.
    async fn create_from_image(
        &self,
        sandbox_id: String,
        config: cri::ContainerConfig,
        infra: bool,
    ) -> Result<String, Status> {
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image.is_empty() {
            return Err(Status::invalid_argument("config.image.image is required"));
        }
        // Reserved until the container is registered, so RemoveImage cannot slip in between.
        let (record, _reserved) = self
            .images
            .reserve(&image)
            .ok_or_else(|| container_status_of(ContainerError::ImageNotFound(image.clone())))?;
        let blob = self
            .images
            .config(&record.id)
            .await
            .map_err(image_status_of)?;
        let process = serde_json::from_slice::<oci_spec::image::ImageConfiguration>(&blob)
            .map_err(|e| {
                Status::failed_precondition(format!("image {image}: invalid config: {e}"))
            })?
            .config()
            .as_ref()
            .map(ImageProcessConfig::from)
            .unwrap_or_default();
        let lower_dirs = self.images.lower_dirs(&record.id).ok_or_else(|| {
            Status::failed_precondition(format!("image {image}: layers are not unpacked"))
        })?;
        let facts = ImageFacts {
            image_ref: record
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| record.id.clone()),
            id: record.id,
            lower_dirs,
            process,
        };
        // Image volumes: each image reserved like the container's own until it is registered.
        let mut volumes = Vec::new();
        let mut _volume_reservations = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            let Some(spec) = m.image.as_ref().filter(|s| !s.image.is_empty()) else {
                continue;
            };
            let (vol, reserved) = self.images.reserve(&spec.image).ok_or_else(|| {
                container_status_of(ContainerError::ImageNotFound(spec.image.clone()))
            })?;
            let lower_dirs = self.images.lower_dirs(&vol.id).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "image volume {}: layers are not unpacked",
                    spec.image
                ))
            })?;
            volumes.push(ImageVolume {
                mount: i,
                id: vol.id,
                lower_dirs,
            });
            _volume_reservations.push(reserved);
        }
        let (containers, sandboxes) = (self.containers.clone(), self.sandboxes.clone());
        blocking_container(move || {
            containers.create(&sandboxes, &sandbox_id, config, facts, volumes, infra)
        })
        .await
    }

    /// Runs the pod's infra container (for handlers that have one): the sandbox image, pulled
    /// if absent, with its own command, in the pod's namespaces and cgroup.
    async fn run_infra_container(
        &self,
        sandbox_id: &str,
        pod: &cri::PodSandboxConfig,
    ) -> Result<(), Status> {
        if self.images.reserve(&self.sandbox_image).is_none() {
            self.images
                .pull(&self.sandbox_image, &Default::default())
                .await
                .map_err(|e| {
                    Status::unavailable(format!(
                        "pull the sandbox image {}: {}",
                        self.sandbox_image,
                        error_chain(&e)
                    ))
                })?;
        }
        let linux = pod.linux.clone().unwrap_or_default();
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: INFRA_CONTAINER_NAME.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.sandbox_image.clone(),
                ..Default::default()
            }),
            linux: Some(cri::LinuxContainerConfig {
                resources: linux.resources.clone(),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: linux
                        .security_context
                        .as_ref()
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let id = self
            .create_from_image(sandbox_id.to_string(), config, true)
            .await?;
        let containers = self.containers.clone();
        blocking_container(move || containers.start(&id)).await
    }
}

#[tonic::async_trait]
impl cri::runtime_service_server::RuntimeService for RuntimeServer {
    async fn version(
        &self,
        request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        let _ = request;
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }
    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        let network = self.sandboxes.cni().config();
        let condition =
            |kind: &str, ok: bool, reason: &str, message: String| cri::RuntimeCondition {
                r#type: kind.into(),
                status: ok,
                reason: if ok { String::new() } else { reason.into() },
                message: if ok { String::new() } else { message },
            };
        let conditions = vec![
            condition("RuntimeReady", true, "", String::new()),
            condition(
                "NetworkReady",
                network.is_ok(),
                "NetworkPluginNotReady",
                network
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
        ];
        let mut info = std::collections::HashMap::new();
        if let (true, Ok(n)) = (verbose, &network) {
            info.insert(
                "cniconfig".to_string(),
                format!(
                    "{{\"name\":{:?},\"path\":{:?}}}",
                    n.name,
                    n.path.display().to_string()
                ),
            );
        }
        let runtime_handlers = self
            .handlers
            .keys()
            .map(|name| cri::RuntimeHandler {
                name: if name == DEFAULT_HANDLER {
                    String::new()
                } else {
                    name.clone()
                },
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures {
                user_namespaces_host_network: false,
                supplemental_groups_policy: false,
                mount_options: false,
            }),
        }))
    }
    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr);
        tracing::info!(pod_cidr = ?cidr, "runtime config update from the kubelet");
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }
    async fn runtime_config(
        &self,
        request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let _ = request;
        let driver = match self.cgroup_driver {
            CgroupDriverKind::Systemd => cri::CgroupDriver::Systemd,
            CgroupDriverKind::Cgroupfs => cri::CgroupDriver::Cgroupfs,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }
    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = request.into_inner();
        let mut config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        if !self.default_cgroup_parent.is_empty() {
            let linux = config.linux.get_or_insert_with(Default::default);
            if linux.cgroup_parent.is_empty() {
                linux.cgroup_parent = self.default_cgroup_parent.clone();
            }
        }
        let handler = if req.runtime_handler.is_empty() {
            DEFAULT_HANDLER.to_string()
        } else {
            req.runtime_handler
        };
        if !self.handlers.contains_key(&handler) {
            return Err(Status::invalid_argument(format!(
                "unknown runtime handler {handler:?}"
            )));
        }
        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let infra = self.handlers[&handler].infra_container;
        let pod = config.clone();
        let sandboxes = self.sandboxes.clone();
        let pod_sandbox_id = blocking(move || sandboxes.run(config, &handler)).await?;
        // The pause process in the pod's cgroup, or no sandbox.
        let pause = self
            .sandboxes
            .get(&pod_sandbox_id)
            .ok()
            .and_then(|sb| sb.record.pause_pid);
        if let Some(pid) = pause
            && let Err(e) = self.containers.join_cgroup(&parent, &pod_sandbox_id, pid)
        {
            let (sandboxes, id) = (self.sandboxes.clone(), pod_sandbox_id.clone());
            let _ = blocking(move || {
                sandboxes.stop(&id)?;
                sandboxes.remove(&id)
            })
            .await;
            return Err(Status::internal(format!(
                "move the pod's pause process into its cgroup {parent:?}: {e}"
            )));
        }
        if infra && let Err(status) = self.run_infra_container(&pod_sandbox_id, &pod).await {
            self.discard_sandbox(&pod_sandbox_id).await;
            return Err(Status::new(
                status.code(),
                format!("run the pod's infra container: {}", status.message()),
            ));
        }
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id }))
    }
    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        // The containers go first, killed at once as containerd does.
        if let Ok(sb) = self.sandboxes.get(&id) {
            let containers = self.containers.clone();
            blocking_container(move || {
                for c in containers.of_sandbox(&sb.record.id) {
                    containers.stop(&c, std::time::Duration::ZERO)?;
                }
                // The infra container last: in gVisor it is the pod's sandbox.
                if let Some(infra) = containers.infra_of(&sb.record.id) {
                    containers.stop(&infra, std::time::Duration::ZERO)?;
                }
                Ok(())
            })
            .await?;
        }
        let parent = self.sandboxes.get(&id).ok().map(|sb| {
            (
                sb.record.id.clone(),
                sb.config.linux.unwrap_or_default().cgroup_parent,
            )
        });
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.stop(&id)).await?;
        // The pause process is gone: so is the sandbox's own cgroup.
        if let Some((id, parent)) = parent {
            self.containers.leave_cgroup(&parent, &id);
        }
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }
    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        if let Ok(sb) = self.sandboxes.get(&id) {
            let containers = self.containers.clone();
            blocking_container(move || {
                for c in containers.of_sandbox(&sb.record.id) {
                    containers.remove(&c)?;
                }
                if let Some(infra) = containers.infra_of(&sb.record.id) {
                    containers.remove(&infra)?;
                }
                Ok(())
            })
            .await?;
        }
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.remove(&id)).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }
    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = request.into_inner();
        let sb = self
            .sandboxes
            .get(&req.pod_sandbox_id)
            .map(|sb| self.with_infra_state(sb))
            .map_err(status_of)?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let json = serde_json::to_string(&sb.record).unwrap_or_default();
            info.insert("info".to_string(), json);
            info.insert("resources".to_string(), pod_resources_json(&sb.config));
        }
        // The kubelet's Evented PLEG reads the containers from a non-verbose status call, so
        // they are always included.
        let containers = self.containers.clone();
        let sandbox_id = sb.record.id.clone();
        let containers_statuses =
            blocking_container(move || Ok(containers_statuses(&containers, &sandbox_id))).await?;
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&sb)),
            info,
            containers_statuses,
            timestamp: now_ns(),
        }))
    }
    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter;
        let items = self
            .sandboxes_now()
            .iter()
            .filter(|sb| matches_filter(sb, filter.as_ref()))
            .map(sandbox_item)
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }
    type StreamPodSandboxesStream = ResponseStream<cri::StreamPodSandboxesResponse>;
    async fn stream_pod_sandboxes(
        &self,
        request: Request<cri::StreamPodSandboxesRequest>,
    ) -> Result<Response<Self::StreamPodSandboxesStream>, Status> {
        let filter = request.into_inner().filter;
        let items: Vec<cri::PodSandbox> = self
            .sandboxes_now()
            .iter()
            .filter(|sb| matches_filter(sb, filter.as_ref()))
            .map(sandbox_item)
            .collect();
        // One message per chunk keeps every response far below the gRPC size limit.
        let chunks: Vec<Result<cri::StreamPodSandboxesResponse, Status>> = items
            .chunks(STREAM_CHUNK)
            .map(|c| {
                Ok(cri::StreamPodSandboxesResponse {
                    pod_sandboxes: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn update_pod_sandbox_resources(
        &self,
        request: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        let req = request.into_inner();
        let sandboxes = self.sandboxes.clone();
        blocking(move || {
            sandboxes.update_resources(&req.pod_sandbox_id, req.overhead, req.resources)
        })
        .await?;
        Ok(Response::new(cri::UpdatePodSandboxResourcesResponse {}))
    }
    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let container_id = self
            .create_from_image(req.pod_sandbox_id, config, false)
            .await?;
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }
    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers.clone();
        blocking_container(move || containers.start(&id)).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }
    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = request.into_inner();
        let timeout = std::time::Duration::from_secs(req.timeout.max(0) as u64);
        let containers = self.containers.clone();
        blocking_container(move || containers.stop(&req.container_id, timeout)).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }
    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers.clone();
        blocking_container(move || containers.remove(&id)).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }
    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = request.into_inner().filter;
        let containers = self.containers.clone();
        let containers = blocking_container(move || {
            Ok(containers
                .list()
                .iter()
                .filter(|c| container_matches(c, filter.as_ref()))
                .map(container_item)
                .collect())
        })
        .await?;
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }
    type StreamContainersStream = ResponseStream<cri::StreamContainersResponse>;
    async fn stream_containers(
        &self,
        request: Request<cri::StreamContainersRequest>,
    ) -> Result<Response<Self::StreamContainersStream>, Status> {
        let filter = request.into_inner().filter;
        let containers = self.containers.clone();
        let items: Vec<cri::Container> = blocking_container(move || {
            Ok(containers
                .list()
                .iter()
                .filter(|c| container_matches(c, filter.as_ref()))
                .map(container_item)
                .collect())
        })
        .await?;
        let chunks: Vec<Result<cri::StreamContainersResponse, Status>> = items
            .chunks(STREAM_CHUNK)
            .map(|c| {
                Ok(cri::StreamContainersResponse {
                    containers: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = request.into_inner();
        let containers = self.containers.clone();
        let id = req.container_id;
        let c = blocking_container(move || containers.get(&id)).await?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let json = serde_json::to_string(&c.record).unwrap_or_default();
            info.insert("info".to_string(), json);
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status(&c)),
            info,
        }))
    }
    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = request.into_inner();
        let Some(linux) = req.linux else {
            return Ok(Response::new(cri::UpdateContainerResourcesResponse {}));
        };
        let containers = self.containers.clone();
        blocking_container(move || containers.update(&req.container_id, linux)).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }
    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        let containers = self.containers.clone();
        blocking_container(move || containers.reopen_log(&id)).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }
    type GetContainerEventsStream = ResponseStream<cri::ContainerEventResponse>;
    async fn get_container_events(
        &self,
        request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let _ = request;
        let rx = self.containers.subscribe();
        let state = (
            rx,
            self.stopping.clone(),
            self.containers.clone(),
            self.sandboxes.clone(),
        );
        let stream = futures::stream::unfold(
            state,
            |(mut rx, mut stopping, containers, sandboxes)| async move {
                loop {
                    let received = tokio::select! {
                        r = rx.recv() => r,
                        _ = stopping.wait_for(|s| *s) => return None,
                    };
                    match received {
                        Ok(event) => {
                            let (c, s) = (containers.clone(), sandboxes.clone());
                            let response =
                                tokio::task::spawn_blocking(move || event_response(&c, &s, event))
                                    .await
                                    .map_err(|e| Status::internal(format!("worker failed: {e}")));
                            return Some((response, (rx, stopping, containers, sandboxes)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "a container events subscriber fell behind");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = request.into_inner();
        let timeout = (req.timeout > 0).then(|| std::time::Duration::from_secs(req.timeout as u64));
        let containers = self.containers.clone();
        let (stdout, stderr, exit_code) =
            blocking_container(move || containers.exec_sync(&req.container_id, req.cmd, timeout))
                .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        }))
    }
    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = request.into_inner();
        check_stdio(
            &req.container_id,
            req.tty,
            req.stdin,
            req.stdout,
            req.stderr,
        )?;
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        let mut req = req;
        req.container_id = self.running_container(&req.container_id, "exec in")?;
        let url = self.park(Pending::Exec(req))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }
    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let mut req = request.into_inner();
        check_stdio(
            &req.container_id,
            req.tty,
            req.stdin,
            req.stdout,
            req.stderr,
        )?;
        req.container_id = self.running_container(&req.container_id, "attach to")?;
        let url = self.park(Pending::Attach(req))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }
    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let mut req = request.into_inner();
        if req.pod_sandbox_id.is_empty() {
            return Err(Status::invalid_argument("missing required pod_sandbox_id"));
        }
        let sb = self.sandboxes.get(&req.pod_sandbox_id).map_err(status_of)?;
        if sandbox_state(&sb) != cri::PodSandboxState::SandboxReady as i32 {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sb.record.id
            )));
        }
        req.pod_sandbox_id = sb.record.id.clone();
        let url = self.park(Pending::PortForward(req))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }
    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        let (containers, samples) = (self.containers.clone(), self.cpu_samples.clone());
        let stats = blocking_container(move || {
            let c = containers.get(&id)?;
            Ok(container_stats(&containers, &samples, &c, now_ns()))
        })
        .await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }
    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let stats = self
            .all_container_stats(request.into_inner().filter)
            .await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }
    type StreamContainerStatsStream = ResponseStream<cri::StreamContainerStatsResponse>;
    async fn stream_container_stats(
        &self,
        request: Request<cri::StreamContainerStatsRequest>,
    ) -> Result<Response<Self::StreamContainerStatsStream>, Status> {
        let stats = self
            .all_container_stats(request.into_inner().filter)
            .await?;
        let chunks: Vec<Result<cri::StreamContainerStatsResponse, Status>> = stats
            .chunks(STREAM_CHUNK)
            .map(|c| {
                Ok(cri::StreamContainerStatsResponse {
                    container_stats: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let sb = self.sandboxes.get(&id).map_err(status_of)?;
        let (containers, samples) = (self.containers.clone(), self.cpu_samples.clone());
        let stats =
            blocking_container(move || Ok(pod_stats(&containers, &samples, &sb, now_ns()))).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }
    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let stats = self.all_pod_stats(request.into_inner().filter).await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }
    type StreamPodSandboxStatsStream = ResponseStream<cri::StreamPodSandboxStatsResponse>;
    async fn stream_pod_sandbox_stats(
        &self,
        request: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
        let stats = self.all_pod_stats(request.into_inner().filter).await?;
        let chunks: Vec<Result<cri::StreamPodSandboxStatsResponse, Status>> = stats
            .chunks(STREAM_CHUNK)
            .map(|c| {
                Ok(cri::StreamPodSandboxStatsResponse {
                    pod_sandbox_stats: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: crate::metrics::descriptors(),
        }))
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let pod_metrics = self.all_pod_metrics().await?;
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics,
        }))
    }
    type StreamPodSandboxMetricsStream = ResponseStream<cri::StreamPodSandboxMetricsResponse>;
    async fn stream_pod_sandbox_metrics(
        &self,
        _request: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
        let metrics = self.all_pod_metrics().await?;
        let chunks: Vec<Result<cri::StreamPodSandboxMetricsResponse, Status>> = metrics
            .chunks(STREAM_CHUNK)
            .map(|c| {
                Ok(cri::StreamPodSandboxMetricsResponse {
                    pod_sandbox_metrics: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(not_yet("CheckpointContainer"))
    }
    async fn checkpoint_pod(
        &self,
        _request: Request<cri::CheckpointPodRequest>,
    ) -> Result<Response<cri::CheckpointPodResponse>, Status> {
        Err(not_yet("CheckpointPod"))
    }
    async fn restore_pod(
        &self,
        _request: Request<cri::RestorePodRequest>,
    ) -> Result<Response<cri::RestorePodResponse>, Status> {
        Err(not_yet("RestorePod"))
    }
}

/// The ImageService implementation.
#[derive(Clone, Debug)]
pub struct ImageServer {
    /// The image store and puller.
    pub images: ImageService,
    /// The containers, whose writable layers ImageFsInfo reports as the container filesystem.
    pub containers: Arc<Containers>,
}

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<String, Status> {
    spec.map(|s| s.image.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::invalid_argument("image.image is required"))
}

impl ImageServer {
    fn list(&self, filter: Option<cri::ImageFilter>) -> Vec<cri::Image> {
        let wanted = filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty())
            .map(|s| self.images.status(&s).map(|r| r.id));
        self.images
            .list()
            .iter()
            .filter(|r| match &wanted {
                None => true,
                Some(id) => id.as_deref() == Some(r.id.as_str()),
            })
            .map(crate::image::cri::to_cri_image)
            .collect()
    }
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageServer {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let images = self.list(request.into_inner().filter);
        Ok(Response::new(cri::ListImagesResponse { images }))
    }
    type StreamImagesStream = ResponseStream<cri::StreamImagesResponse>;
    async fn stream_images(
        &self,
        request: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let images = self.list(request.into_inner().filter);
        let chunks: Vec<Result<cri::StreamImagesResponse, Status>> = images
            .chunks(STREAM_CHUNK)
            .map(|c| Ok(cri::StreamImagesResponse { images: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let name = image_name(req.image.as_ref())?;
        let record = self.images.status(&name);
        let mut info = std::collections::HashMap::new();
        if let (true, Some(r)) = (req.verbose, &record) {
            info.insert(
                "info".to_string(),
                serde_json::json!({"manifestDigest": r.manifest_digest, "chainIDs": r.chain_ids().collect::<Vec<_>>()})
                    .to_string(),
            );
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: record.as_ref().map(crate::image::cri::to_cri_image),
            info,
        }))
    }
    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = request.into_inner();
        let name = image_name(req.image.as_ref())?;
        let auth = req
            .auth
            .as_ref()
            .map(crate::image::PullAuth::from)
            .unwrap_or_default();
        let image_ref = self
            .images
            .pull(&name, &auth)
            .await
            .map_err(image_status_of)?;
        tracing::info!(image = %name, id = %image_ref, "image pulled");
        Ok(Response::new(cri::PullImageResponse { image_ref }))
    }
    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = image_name(request.into_inner().image.as_ref())?;
        self.images.remove(&name).await.map_err(image_status_of)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }
    async fn image_fs_info(
        &self,
        request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let _ = request;
        let info = self.images.fs_info().await.map_err(image_status_of)?;
        let containers = self.containers.clone();
        let writable = blocking_container(move || Ok(containers.writable_layers(now_ns()))).await?;
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![crate::image::cri::to_cri_usage(&info)],
            container_filesystems: vec![writable],
        }))
    }
}
