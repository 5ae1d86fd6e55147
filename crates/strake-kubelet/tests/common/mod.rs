//! Shared by the kubelet's integration tests. The node itself (a runtime and strake-kubelet in a
//! node namespace) is `strake_integration::kubelet::KubeletNode`.

#![allow(dead_code)]

use std::time::Duration;

#[allow(unused_imports)] // each test file uses a different part
pub use strake_integration::kubelet::{KubeletNode, RuntimeKind};

/// Polls `f` every 250 ms until it yields a value; panics after `secs`.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// A control plane (no controllers needed beyond the defaults), the local registry, an admin
/// client and one node running strake-kubelet on `kind`, registered with the API server.
/// Dropped in reverse order of the fields.
pub struct Cluster {
    pub node: KubeletNode,
    pub client: kube::Client,
    pub registry: strake_integration::registry::Registry,
    pub cp: strake_integration::control_plane::ControlPlane,
}

impl Cluster {
    /// Starts everything and waits until node `name` is registered.
    pub async fn start(name: &str, kind: RuntimeKind) -> Cluster {
        Self::start_with(name, kind, "").await
    }

    /// As [`Cluster::start`], with `extra_config` appended to the KubeletConfiguration.
    pub async fn start_with(name: &str, kind: RuntimeKind, extra_config: &str) -> Cluster {
        use strake_integration::control_plane::{ControlPlane, Options};
        let cp = ControlPlane::start(Options::default())
            .await
            .expect("control plane");
        let registry =
            strake_integration::registry::Registry::start(cp.net(), &cp.dir().join("registry"))
                .expect("registry");
        let client = cp.client().await.expect("client");
        let node = KubeletNode::start_on(&cp, 0, name, extra_config, kind)
            .await
            .expect("start node");
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        wait_for("node registered", 60, || async {
            nodes.get_opt(name).await.ok().flatten()
        })
        .await;
        Cluster {
            node,
            client,
            registry,
            cp,
        }
    }

    /// `strake/busybox:1` as the node pulls it.
    pub fn busybox(&self) -> String {
        format!("{}/strake/busybox:1", self.registry.open_in_cluster())
    }
}

/// The directory of cgroup `path` below a node's relative cgroup parent `root` in controller
/// `controller`'s hierarchy (the single directory on v2), resolved against this process's own
/// cgroup as the kubelet and the OCI runtime resolve a relative `cgroupRoot`.
pub fn cgroup_dir(root: &str, path: &str, controller: &str) -> std::path::PathBuf {
    use strake_types::cgroups::{CgroupDriver, CgroupLayout, ContainerCgroup};
    let layout = CgroupLayout::detect().expect("cgroup layout");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    match layout
        .pod_cgroup(CgroupDriver::Cgroupfs, &format!("{root}/{path}"), &own)
        .expect("a cgroup")
    {
        ContainerCgroup::V1(m) => m.get(controller).cloned().expect("controller mounted"),
        ContainerCgroup::V2(d) => d,
    }
}
