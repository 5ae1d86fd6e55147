//! The connection to the CRI runtime (strake-runtime, containerd, CRI-O).

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
}

impl RuntimeError {
    /// The error with the runtime's own words, for the messages users read in pod status.
    pub fn detail(&self) -> String {
        match self {
            RuntimeError::Call { rpc, source } => {
                format!("CRI {rpc} failed: {}", source.message())
            }
            RuntimeError::SandboxConfig(e) => e.to_string(),
            other => other.to_string(),
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

    async fn call<T>(
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
