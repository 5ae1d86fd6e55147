//! The connection to the CRI runtime (strake-runtime, containerd, CRI-O).
//!
//! [`Cri`] is the seam the pod workers use: the typed runtime calls they make, implemented over
//! tonic by [`Runtime`] and by a recording fake in unit tests (`runtime::fake`, test builds only).

use std::time::Duration;

use strake_types::cri;
use strake_types::cri::image_service_client::ImageServiceClient;
use strake_types::cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The runtime could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The endpoint is not a `unix://` path.
    #[error("unsupported container runtime endpoint {0:?} (expected unix:///path)")]
    Endpoint(String),
    /// A CRI call failed.
    #[error("CRI {rpc} failed")]
    Call {
        rpc: &'static str,
        #[source]
        source: tonic::Status,
    },
    /// The runtime did not answer in time.
    #[error("CRI {rpc} timed out after {secs} s")]
    Timeout { rpc: &'static str, secs: u64 },
    /// The pod's sandbox configuration cannot be made (no CRI call was made).
    #[error("pod sandbox configuration")]
    SandboxConfig(#[source] crate::pod_spec::SandboxConfigError),
    /// The pod's cgroup could not be made (no CRI call was made).
    #[error("unable to ensure pod container exists")]
    PodCgroup(#[source] crate::pod_cgroups::CgroupError),
}

impl RuntimeError {
    /// The error with the runtime's own words, for the messages users read in pod status.
    pub fn detail(&self) -> String {
        match self {
            RuntimeError::Call { rpc, source } => {
                format!("CRI {rpc} failed: {}", source.message())
            }
            RuntimeError::SandboxConfig(e) => e.to_string(),
            RuntimeError::PodCgroup(e) => {
                let cause = std::error::Error::source(e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                format!("unable to ensure pod container exists: {e}{cause}")
            }
            other => other.to_string(),
        }
    }

    /// What the runtime said, alone (upstream's kubelet puts a failed CreateContainer's or
    /// StartContainer's gRPC message in the container's waiting state and its event as is).
    pub fn message(&self) -> String {
        match self {
            RuntimeError::Call { source, .. } => source.message().to_string(),
            other => other.detail(),
        }
    }
}

/// A lazily connecting CRI client: a runtime that is down now may be up on the next call.
#[derive(Clone, Debug)]
pub struct Runtime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

/// What the runtime says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeHealth {
    /// `<runtime_name>://<runtime_version>`, as nodeInfo reports it.
    pub version: String,
    /// `Err(message)` unless RuntimeReady is true.
    pub runtime_ready: Result<(), String>,
    /// `Err(message)` unless NetworkReady is true.
    pub network_ready: Result<(), String>,
}

impl Runtime {
    /// A client for `endpoint` (`unix:///run/strake/runtime.sock`); connects on first use.
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, RuntimeError> {
        let path = endpoint
            .strip_prefix("unix://")
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| RuntimeError::Endpoint(endpoint.to_string()))?
            .to_string();
        // The URI is a placeholder required by tonic; the connector dials the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Ok(Runtime {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout,
        })
    }

    pub(crate) async fn call<T>(
        &self,
        rpc: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RuntimeError> {
        self.call_with(rpc, None, fut).await
    }

    /// The RuntimeService client with this runtime's per-call timeout applied by [`Runtime::call`].
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The ImageService client.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// Runs one CRI call with a timeout (`long` for pulls and stops, which legitimately take
    /// longer than the default).
    pub async fn call_with<T>(
        &self,
        rpc: &'static str,
        long: Option<Duration>,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RuntimeError> {
        let timeout = long.unwrap_or(self.timeout);
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(source)) => Err(RuntimeError::Call { rpc, source }),
            Err(_) => Err(RuntimeError::Timeout {
                rpc,
                secs: timeout.as_secs(),
            }),
        }
    }

    /// The cgroup driver the runtime uses (CRI `RuntimeConfig`), which the kubelet follows as
    /// upstream's does; `None` from a runtime that does not implement the call.
    pub async fn cgroup_driver(
        &self,
    ) -> Result<Option<strake_types::cgroups::CgroupDriver>, RuntimeError> {
        use strake_types::cgroups::CgroupDriver;
        let mut client = self.runtime.clone();
        match self
            .call(
                "RuntimeConfig",
                client.runtime_config(cri::RuntimeConfigRequest {}),
            )
            .await
        {
            Ok(r) => Ok(r.linux.map(|l| {
                if l.cgroup_driver == cri::CgroupDriver::Systemd as i32 {
                    CgroupDriver::Systemd
                } else {
                    CgroupDriver::Cgroupfs
                }
            })),
            Err(RuntimeError::Call { source, .. })
                if source.code() == tonic::Code::Unimplemented =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Version and Status in one: the runtime's identity and readiness.
    pub async fn health(&self) -> Result<RuntimeHealth, RuntimeError> {
        let mut client = self.runtime.clone();
        let v = self
            .call(
                "Version",
                client.version(cri::VersionRequest {
                    version: "v1".into(),
                }),
            )
            .await?;
        let s = self
            .call(
                "Status",
                client.status(cri::StatusRequest { verbose: false }),
            )
            .await?;
        let conditions = s.status.map(|st| st.conditions).unwrap_or_default();
        let check = |kind: &str| -> Result<(), String> {
            match conditions.iter().find(|c| c.r#type == kind) {
                Some(c) if c.status => Ok(()),
                Some(c) => Err(format!(
                    "{kind}=false reason:{} message:{}",
                    c.reason, c.message
                )),
                None => Err(format!("{kind} missing from runtime status")),
            }
        };
        Ok(RuntimeHealth {
            version: format!("{}://{}", v.runtime_name, v.runtime_version),
            runtime_ready: check("RuntimeReady"),
            network_ready: check("NetworkReady"),
        })
    }
}

/// The runtime calls a pod worker makes, typed; implemented over tonic by [`Runtime`].
#[async_trait::async_trait]
pub trait Cri: Send + Sync + std::fmt::Debug {
    /// The sandboxes labelled with pod UID `uid`; every sandbox with `None`.
    async fn list_sandboxes(&self, uid: Option<&str>)
    -> Result<Vec<cri::PodSandbox>, RuntimeError>;
    /// RunPodSandbox; returns the new sandbox's ID.
    async fn run_sandbox(
        &self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, RuntimeError>;
    async fn stop_sandbox(&self, id: &str) -> Result<(), RuntimeError>;
    async fn remove_sandbox(&self, id: &str) -> Result<(), RuntimeError>;
    async fn sandbox_status(&self, id: &str)
    -> Result<Option<cri::PodSandboxStatus>, RuntimeError>;
    /// The containers labelled with pod UID `uid`; every container with `None`.
    async fn list_containers(&self, uid: Option<&str>)
    -> Result<Vec<cri::Container>, RuntimeError>;
    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<cri::ContainerStatus>, RuntimeError>;
    /// CreateContainer; returns the new container's ID.
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox_config: cri::PodSandboxConfig,
    ) -> Result<String, RuntimeError>;
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// StopContainer with `grace` before the runtime kills it.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// UpdateContainerResources: container `id` gets `resources` while it runs.
    async fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), RuntimeError>;
    /// ExecSync of `cmd` in container `id`, bounded by `timeout` (zero: the runtime's default).
    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, RuntimeError>;
    /// The image `image` (`None`: not present).
    async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, RuntimeError>;
    /// PullImage; returns the image reference to create containers with.
    async fn pull_image(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, RuntimeError>;
}

fn uid_selector(uid: &str) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([(
        crate::pod_spec::labels::POD_UID.to_string(),
        uid.to_string(),
    )])
}

/// Sandbox and container lifecycle calls may legitimately take long (networking, image
/// unpacking, a slow stop).
const LONG: Duration = Duration::from_secs(120);

#[async_trait::async_trait]
impl Cri for Runtime {
    async fn list_sandboxes(
        &self,
        uid: Option<&str>,
    ) -> Result<Vec<cri::PodSandbox>, RuntimeError> {
        let mut c = self.runtime.clone();
        let filter = uid.map(|uid| cri::PodSandboxFilter {
            label_selector: uid_selector(uid),
            ..Default::default()
        });
        let r = self
            .call(
                "ListPodSandbox",
                c.list_pod_sandbox(cri::ListPodSandboxRequest { filter }),
            )
            .await?;
        Ok(r.items)
    }

    async fn run_sandbox(
        &self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, RuntimeError> {
        let mut c = self.runtime.clone();
        let r = self
            .call_with(
                "RunPodSandbox",
                Some(LONG),
                c.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: handler.to_string(),
                }),
            )
            .await?;
        Ok(r.pod_sandbox_id)
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "StopPodSandbox",
            Some(Duration::from_secs(60)),
            c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    async fn remove_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "RemovePodSandbox",
            Some(Duration::from_secs(60)),
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    async fn sandbox_status(
        &self,
        id: &str,
    ) -> Result<Option<cri::PodSandboxStatus>, RuntimeError> {
        let mut c = self.runtime.clone();
        let r = self
            .call(
                "PodSandboxStatus",
                c.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.to_string(),
                    verbose: false,
                }),
            )
            .await?;
        Ok(r.status)
    }

    async fn list_containers(
        &self,
        uid: Option<&str>,
    ) -> Result<Vec<cri::Container>, RuntimeError> {
        let mut c = self.runtime.clone();
        let filter = uid.map(|uid| cri::ContainerFilter {
            label_selector: uid_selector(uid),
            ..Default::default()
        });
        let r = self
            .call(
                "ListContainers",
                c.list_containers(cri::ListContainersRequest { filter }),
            )
            .await?;
        Ok(r.containers)
    }

    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<cri::ContainerStatus>, RuntimeError> {
        let mut c = self.runtime.clone();
        let r = self
            .call(
                "ContainerStatus",
                c.container_status(cri::ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: false,
                }),
            )
            .await?;
        Ok(r.status)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox_config: cri::PodSandboxConfig,
    ) -> Result<String, RuntimeError> {
        let mut c = self.runtime.clone();
        let r = self
            .call_with(
                "CreateContainer",
                Some(LONG),
                c.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.to_string(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                }),
            )
            .await?;
        Ok(r.container_id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "StartContainer",
            Some(LONG),
            c.start_container(cri::StartContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "StopContainer",
            Some(grace + Duration::from_secs(30)),
            c.stop_container(cri::StopContainerRequest {
                container_id: id.to_string(),
                timeout: grace.as_secs() as i64,
            }),
        )
        .await
        .map(drop)
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "RemoveContainer",
            Some(Duration::from_secs(60)),
            c.remove_container(cri::RemoveContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    async fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        self.call_with(
            "UpdateContainerResources",
            None,
            c.update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.to_string(),
                linux: Some(resources),
                ..Default::default()
            }),
        )
        .await
        .map(drop)
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, RuntimeError> {
        let mut c = self.runtime.clone();
        // The runtime enforces `timeout`; the call itself gets a little longer to say so.
        let limit = if timeout.is_zero() {
            EXEC_UNBOUNDED
        } else {
            timeout + Duration::from_secs(2)
        };
        self.call_with(
            "ExecSync",
            Some(limit),
            c.exec_sync(cri::ExecSyncRequest {
                container_id: id.to_string(),
                cmd,
                timeout: timeout.as_secs() as i64,
            }),
        )
        .await
    }

    async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, RuntimeError> {
        let mut c = self.images.clone();
        let r = self
            .call(
                "ImageStatus",
                c.image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    verbose: false,
                }),
            )
            .await?;
        Ok(r.image)
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, RuntimeError> {
        let mut c = self.images.clone();
        let r = self
            .call_with(
                "PullImage",
                Some(Duration::from_secs(600)),
                c.pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    auth,
                    sandbox_config: None,
                }),
            )
            .await?;
        Ok(r.image_ref)
    }
}

/// The longest an exec without a timeout of its own (a postStart hook, as upstream runs it)
/// may hold its worker.
const EXEC_UNBOUNDED: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_unix_endpoints_are_accepted_and_a_missing_socket_is_an_error() {
        assert!(matches!(
            Runtime::new("tcp://1.2.3.4:1", Duration::from_secs(1)),
            Err(RuntimeError::Endpoint(_))
        ));
        assert!(matches!(
            Runtime::new("unix://relative", Duration::from_secs(1)),
            Err(RuntimeError::Endpoint(_))
        ));
        let rt = Runtime::new("unix:///nonexistent/strake.sock", Duration::from_secs(1)).unwrap();
        assert!(rt.health().await.is_err());
    }
}

#[cfg(test)]
pub mod fake;
