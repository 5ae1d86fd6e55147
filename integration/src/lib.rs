//! Strake's test bed: real upstream components, started and torn down by tests.
//!
//! Everything here runs real programs: etcd and kube-apiserver built from upstream's Go modules
//! (see `integration/testbed/build-upstream.sh`), Debian's docker-registry serving images built
//! locally (`integration/testbed/build-images.sh`), network namespaces made with iproute2.
//!
//! The network layout keeps every packet off the machine's uplink:
//!
//! ```text
//!  root netns            "cluster" netns (ClusterNet)                "node" netns (NodeNs)
//!  127.0.0.1:<port> ──fwd──▶ 127.0.0.1:6443 kube-apiserver
//!                            bridge tb0 10.213.0.1/24 ◀── veth ──▶ eth0 10.213.0.<10+i>/24
//!                            :5000 registry, :5001 registry (auth)
//! ```
//!
//! The root namespace only ever talks to loopback: a small forwarder ([`forward`]) accepts on
//! root-namespace loopback and connects inside the cluster namespace. Node namespaces reach the
//! control plane and the registry over their veth, as a real node would over its network.
//!
//! Start reading at [`control_plane::ControlPlane`] and [`netns::ClusterNet`]. Every object
//! here is a guard: dropping it stops what it started (by PID) and removes what it created.

pub mod cgroup;
pub mod cluster;
pub mod conformance;
pub mod containerd;
pub mod control_plane;
pub mod cri;
pub mod demo;
pub mod forward;
pub mod kube_proxy;
pub mod kubectl;
pub mod kubelet;
pub mod netns;
pub mod paths;
pub mod pki;
pub mod process;
pub mod registry;
pub mod strake_runtime;
pub mod systemd;
pub mod upstream_kubelet;

/// An error of the test bed, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary the test bed builds is missing from the cache.
    #[error("{path} is missing: run `make testbed` first")]
    MissingBinary { path: std::path::PathBuf },
    /// A program exited unsuccessfully.
    #[error("{program} {args:?} failed ({status}): {stderr}")]
    CommandFailed {
        program: String,
        args: Vec<String>,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A program could not be started at all.
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A daemon the test bed started exited before it became ready.
    #[error("{name} exited early ({status}); last log lines:\n{log_tail}")]
    DaemonExited {
        name: String,
        status: std::process::ExitStatus,
        log_tail: String,
    },
    /// Something did not become ready in time.
    #[error("{what} not ready after {secs} s: {last_error}")]
    Timeout {
        what: String,
        secs: u64,
        last_error: String,
    },
    /// Certificates could not be generated.
    #[error("generate certificate {name}")]
    Certificate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    /// A caller asked for something the test bed cannot do.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be built.
    #[error("build a Kubernetes client from {kubeconfig}")]
    Client {
        kubeconfig: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for the test bed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<std::path::PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
