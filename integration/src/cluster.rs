//! A multi-node cluster for upstream's conformance suite (`strake-testbed cluster`,
//! `make conformance`).
//!
//! ```text
//!  "cluster" netns: etcd, kube-apiserver (aggregator routing, front-proxy flags),
//!                   controller-manager (node IPAM: --allocate-node-cidrs), scheduler,
//!                   registries :5000/:5001 (test images) and :5002 (conformance images),
//!                   routes 10.244.<n>.0/24 via each node; e2e.test runs here
//!      bridge tb0 10.213.0.1/24
//!        ├── node-0 netns  eth0 10.213.0.10  runtime + kubelet + proxy, pods on ptp veths
//!        └── node-1 netns  eth0 10.213.0.11  ... routes to the other nodes' pod CIDRs
//! ```
//!
//! Pod networking is kindnet's: each node's pod CIDR comes from the controller-manager's node
//! IPAM (`spec.podCIDR`, read once the kubelet has registered the Node), its runtime gets a
//! `ptp` + `host-local` + `portmap` CNI configuration for that CIDR, and every node (and the
//! cluster namespace) routes the other nodes' pod CIDRs via their node addresses. All of it
//! lives in the test bed's namespaces. CoreDNS runs as upstream's addon manifest deploys it
//! (Deployment + `kube-dns` Service at [`CLUSTER_DNS`]). Images named `registry.k8s.io/...`
//! come from the conformance registry through the runtimes' registry mirrors.
//!
//! Node kinds: [`NodeKind::Strake`] (strake-runtime + strake-kubelet + strake-proxy),
//! [`NodeKind::Upstream`] (containerd + kubelet + kube-proxy, the baseline) and the swap-in
//! mixes, each one upstream daemon replaced by its Strake twin: [`NodeKind::SwapRuntime`],
//! [`NodeKind::SwapKubelet`] and [`NodeKind::SwapProxy`] (strake-proxy deployed as the
//! DaemonSet of `manifests/proxy/`, its image pushed to a [`ScratchRegistry`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::containerd::Containerd;
use crate::control_plane::{ControlPlane, Options as CpOptions, POD_CIDR};
use crate::forward::Forward;
use crate::kubelet::{NodeRuntime, RuntimeKind};
use crate::netns::{CLUSTER_GATEWAY, NodeNs};
use crate::process::Daemon;
use crate::registry::{Registry, SCRATCH_PORT, ScratchRegistry};
use crate::strake_runtime::StrakeRuntime;
use crate::upstream_kubelet::{self, KubeletCgroupRoot, UpstreamKubelet};
use crate::{Error, Result, kube_proxy, paths, process};

/// The cluster DNS Service's address (`clusterDNS` of every kubelet).
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Port of the conformance image registry in the cluster namespace.
pub const CONFORMANCE_REGISTRY_PORT: u16 = 5002;
/// Registries whose images the conformance registry holds (under the same repository paths).
pub const MIRRORED_REGISTRIES: &[&str] = &["registry.k8s.io"];

const VERSIONS_ENV: &str = include_str!("../versions.env");

/// Which daemons a node runs: all of Strake's, all of upstream's, or one of the swap-in mixes
/// (one upstream daemon replaced by its Strake twin, the way a user would try Strake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// strake-runtime, strake-kubelet, strake-proxy.
    Strake,
    /// containerd, the upstream kubelet, kube-proxy.
    Upstream,
    /// (a) The runtime swapped in: the upstream kubelet on strake-runtime, kube-proxy.
    SwapRuntime,
    /// (b) The kubelet swapped in: strake-kubelet on containerd, kube-proxy.
    SwapKubelet,
    /// (c) The proxy swapped in: the upstream kubelet on containerd, strake-proxy deployed as
    /// the DaemonSet of `manifests/proxy/` through the API (its image built and pushed to a
    /// registry of the bed) instead of kube-proxy.
    SwapProxy,
}

/// How a node's Services are proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    KubeProxy,
    /// strake-proxy started by the bed next to the kubelet.
    StrakeProxy,
    /// strake-proxy as a DaemonSet, after the nodes are up.
    StrakeProxyDaemonSet,
}

impl NodeKind {
    /// Every kind, for `--help` and tests.
    pub const ALL: [NodeKind; 5] = [
        NodeKind::Strake,
        NodeKind::Upstream,
        NodeKind::SwapRuntime,
        NodeKind::SwapKubelet,
        NodeKind::SwapProxy,
    ];

    /// The node's CRI runtime.
    pub fn runtime(self) -> RuntimeKind {
        match self {
            NodeKind::Strake | NodeKind::SwapRuntime => RuntimeKind::Strake,
            NodeKind::Upstream | NodeKind::SwapKubelet | NodeKind::SwapProxy => {
                RuntimeKind::Containerd
            }
        }
    }

    /// Whether the node's kubelet is strake-kubelet.
    pub fn strake_kubelet(self) -> bool {
        matches!(self, NodeKind::Strake | NodeKind::SwapKubelet)
    }

    /// The node's proxy.
    pub fn proxy(self) -> ProxyKind {
        match self {
            NodeKind::Strake => ProxyKind::StrakeProxy,
            NodeKind::SwapProxy => ProxyKind::StrakeProxyDaemonSet,
            NodeKind::Upstream | NodeKind::SwapRuntime | NodeKind::SwapKubelet => {
                ProxyKind::KubeProxy
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            NodeKind::Strake => "strake",
            NodeKind::Upstream => "upstream",
            NodeKind::SwapRuntime => "swap-runtime",
            NodeKind::SwapKubelet => "swap-kubelet",
            NodeKind::SwapProxy => "swap-proxy",
        }
    }
}

impl std::str::FromStr for NodeKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NodeKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown node kind {s:?} (strake, upstream, swap-runtime, swap-kubelet or swap-proxy)"
                ))
            })
    }
}

impl std::fmt::Display for NodeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of nodes (1..=20).
    pub nodes: u8,
    /// Their kind.
    pub kind: NodeKind,
}

/// The repository (the test-bed scripts and `manifests/` are run from it).
fn repo_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Invalid("no repository root".into()))
}

/// The pinned version of `key` in `integration/versions.env`.
fn pinned(key: &str) -> String {
    VERSIONS_ENV
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn existing(path: PathBuf, how: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::Invalid(format!(
            "{} is missing: run `{how}` first",
            path.display()
        )))
    }
}

/// A binary of the conformance bed (`e2e.test`, `ginkgo`, `agnhost`, `sample-apiserver`).
pub fn conformance_bin(name: &str) -> Result<PathBuf> {
    existing(
        paths::cache_dir()
            .join(format!("conformance-{}", pinned("KUBERNETES_VERSION")))
            .join("bin")
            .join(name),
        "make conformance-bed",
    )
}

/// Upstream's CoreDNS addon manifest of the pinned release (with its `__DNS__...__` holes).
pub fn coredns_manifest() -> Result<PathBuf> {
    existing(
        paths::cache_dir()
            .join(format!("conformance-{}", pinned("KUBERNETES_VERSION")))
            .join("coredns.yaml.base"),
        "make conformance-bed",
    )
}

/// The conformance images' registry storage root.
pub fn conformance_images_dir() -> Result<PathBuf> {
    let current = paths::cache_dir().join("conformance-images-current");
    existing(current.join("images.txt"), "make conformance-bed")?;
    Ok(current.join("open"))
}

/// The CNI configuration of a node whose pod CIDR is `pod_cidr` (kindnet's: point-to-point
/// veths, addresses from host-local kept in `ipam_dir`, host ports by portmap).
pub fn ptp_conflist(pod_cidr: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "strake-cluster",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{ "subnet": pod_cidr }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
    .to_string()
}

/// The routes node `me` needs: every other node's pod CIDR via that node's address.
pub fn routes_for(me: Ipv4Addr, nodes: &[(Ipv4Addr, String)]) -> Vec<(String, Ipv4Addr)> {
    nodes
        .iter()
        .filter(|(ip, _)| *ip != me)
        .map(|(ip, cidr)| (cidr.clone(), *ip))
        .collect()
}

/// Upstream's CoreDNS manifest with the cluster's values filled in.
pub fn fill_coredns_manifest(base: &str) -> String {
    base.replace("__DNS__DOMAIN__", CLUSTER_DOMAIN)
        .replace("__DNS__SERVER__", CLUSTER_DNS)
        .replace("__DNS__MEMORY__LIMIT__", "170Mi")
}

/// The conformance image registry: docker-registry serving the cached storage read-only.
#[derive(Debug)]
pub struct ConformanceRegistry {
    _forward: Forward,
    _daemon: Daemon,
    local: SocketAddr,
}

impl ConformanceRegistry {
    /// Serves the conformance images at `10.213.0.1:5002` in the cluster namespace.
    pub fn start(cp: &ControlPlane, dir: &Path) -> Result<Self> {
        let root = conformance_images_dir()?;
        std::fs::create_dir_all(dir).map_err(crate::io_err("create", dir))?;
        let config = dir.join("registry-conformance.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n  \
             delete:\n    enabled: false\nhttp:\n  addr: 0.0.0.0:{CONFORMANCE_REGISTRY_PORT}\n  secret: strake-testbed\n",
            root.display()
        );
        std::fs::write(&config, text).map_err(crate::io_err("write", &config))?;
        let mut cmd = cp.net().ns().command("/usr/bin/docker-registry");
        cmd.arg("serve").arg(&config);
        let daemon = Daemon::spawn(
            "registry-conformance",
            cmd,
            &dir.join("registry-conformance.log"),
        )?;
        let forward = Forward::start(
            cp.net().ns(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, CONFORMANCE_REGISTRY_PORT)),
            &dir.join("forward-registry-conformance.log"),
        )?;
        let local = forward.local_addr();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match crate::registry::http_status(local, "/v2/") {
                Ok(200) => break,
                other if Instant::now() > deadline => {
                    return Err(Error::Timeout {
                        what: "conformance registry".into(),
                        secs: 30,
                        last_error: format!("{other:?}"),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        Ok(ConformanceRegistry {
            _forward: forward,
            _daemon: daemon,
            local,
        })
    }

    /// The registry from the root namespace.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The registry as nodes see it.
    pub fn in_cluster(&self) -> SocketAddr {
        SocketAddr::from((CLUSTER_GATEWAY, CONFORMANCE_REGISTRY_PORT))
    }
}

/// A node's kubelet.
enum NodeKubelet {
    Strake(Daemon),
    Upstream(UpstreamKubelet),
}

/// A running node. Dropped kubelet first (it would recreate pods), then the proxy, then the
/// runtime (which removes the pods), then the namespace, the cgroups and the directory.
pub struct ClusterNode {
    kubelet: NodeKubelet,
    proxy: Option<Daemon>,
    runtime: NodeRuntime,
    ns: NodeNs,
    _cgroup_root: Option<KubeletCgroupRoot>,
    dir: NodeDir,
    name: String,
}

/// A node's directory; everything mounted below it is unmounted before it is removed (after
/// the runtime, declared earlier, has removed its containers).
struct NodeDir(tempfile::TempDir);

impl NodeDir {
    fn new() -> Result<Self> {
        Ok(NodeDir(
            tempfile::Builder::new()
                .prefix("strake-cluster-node-")
                .tempdir()
                .map_err(crate::io_err("create", std::env::temp_dir()))?,
        ))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for NodeDir {
    fn drop(&mut self) {
        crate::containerd::unmount_below(self.0.path());
    }
}

/// Size of the tmpfs holding a strake-kubelet's root directory.
const KUBELET_ROOT_TMPFS: &str = "size=4g,mode=0755";

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let NodeKubelet::Strake(k) = &mut self.kubelet {
            k.stop(Duration::from_secs(10));
        }
        if let Some(p) = self.proxy.as_mut() {
            p.stop(Duration::from_secs(10));
        }
    }
}

impl ClusterNode {
    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's namespace.
    pub fn ns(&self) -> &NodeNs {
        &self.ns
    }

    /// The node's CRI runtime.
    pub fn runtime(&self) -> &NodeRuntime {
        &self.runtime
    }

    /// Where the runtime reads its CNI configuration.
    fn cni_conf_dir(&self) -> PathBuf {
        match &self.runtime {
            NodeRuntime::Strake(r) => r.dir().join("cni"),
            NodeRuntime::Containerd(r) => r.dir().join("cni"),
        }
    }

    /// Log files of the node's daemons (for failure messages and the reports folder).
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let mut v = Vec::new();
        match &self.kubelet {
            NodeKubelet::Strake(_) => {
                v.push(("strake-kubelet".into(), self.dir.path().join("kubelet.log")))
            }
            NodeKubelet::Upstream(k) => v.push(("kubelet".into(), k.log_path())),
        }
        if self.proxy.is_some() {
            v.push(("proxy".into(), self.dir.path().join("proxy.log")));
        }
        match &self.runtime {
            NodeRuntime::Strake(r) => {
                v.push(("strake-runtime".into(), r.dir().join("runtime.log")))
            }
            NodeRuntime::Containerd(r) => {
                v.push(("containerd".into(), r.dir().join("containerd.log")))
            }
        }
        v
    }

    fn check_running(&mut self) -> Result<()> {
        match &mut self.kubelet {
            NodeKubelet::Strake(k) => k.check_running()?,
            NodeKubelet::Upstream(k) => k.check_running()?,
        }
        if let Some(p) = self.proxy.as_mut() {
            p.check_running()?;
        }
        if !process::pid_alive(self.runtime.pid()) {
            return Err(Error::Invalid(format!(
                "the runtime of {} exited",
                self.name
            )));
        }
        Ok(())
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The kubelet configuration both kinds share: cluster DNS, serving certificate of the
/// cluster CA (the API server verifies it), client certificates of the cluster CA accepted.
fn kubelet_tls(cp: &ControlPlane, ns: &NodeNs, name: &str) -> Result<String> {
    let serving = cp.pki().issue_server(
        &format!("kubelet-serving-{name}"),
        name,
        &[name.to_string(), ns.ip().to_string()],
    )?;
    Ok(format!(
        "tlsCertFile: {}\ntlsPrivateKeyFile: {}\nclusterDNS:\n- {CLUSTER_DNS}\nclusterDomain: {CLUSTER_DOMAIN}\n",
        serving.cert.display(),
        serving.key.display(),
    ))
}

fn mirror_flags(registry: SocketAddr) -> Vec<String> {
    let mut v: Vec<String> = MIRRORED_REGISTRIES
        .iter()
        .map(|r| format!("--registry-mirror={r}=http://{registry}"))
        .collect();
    v.push(format!("--insecure-registry={registry}"));
    v.push(format!(
        "--insecure-registry={}",
        SocketAddr::from((CLUSTER_GATEWAY, SCRATCH_PORT))
    ));
    v
}

/// Starts the node's runtime, with `registry.k8s.io` mirrored to the conformance registry.
async fn start_runtime(
    kind: RuntimeKind,
    ns: &mut NodeNs,
    index: u8,
    mirror: SocketAddr,
) -> Result<NodeRuntime> {
    Ok(match kind {
        RuntimeKind::Strake => {
            NodeRuntime::Strake(StrakeRuntime::start_with(ns, index, &mirror_flags(mirror)).await?)
        }
        RuntimeKind::Containerd => {
            let runtime = Containerd::start(ns, index).await?;
            // containerd reads its hosts directory at each pull: send registry.k8s.io to the
            // mirror.
            for r in MIRRORED_REGISTRIES {
                let hosts = runtime.dir().join("certs.d").join(r);
                std::fs::create_dir_all(&hosts).map_err(crate::io_err("create", &hosts))?;
                let file = hosts.join("hosts.toml");
                std::fs::write(
                    &file,
                    format!(
                        "server = \"https://{r}\"\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                    ),
                )
                .map_err(crate::io_err("write", &file))?;
            }
            NodeRuntime::Containerd(runtime)
        }
    })
}

/// strake-kubelet on `runtime`, its root directory on a tmpfs.
fn start_strake_kubelet(
    cp: &ControlPlane,
    ns: &NodeNs,
    name: &str,
    runtime: &NodeRuntime,
    dir: &Path,
) -> Result<Daemon> {
    // The kubelet's root directory (volumes) is a tmpfs, and its eviction thresholds are
    // absolute ones (`TEST_EVICTION_HARD`): a shared test machine's disk is often fuller than
    // upstream's defaults allow.
    let root = dir.join("root");
    std::fs::create_dir_all(&root).map_err(crate::io_err("create", &root))?;
    process::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", KUBELET_ROOT_TMPFS, "tmpfs"])
            .arg(&root),
    )?;
    let kubeconfig = cp.node_kubeconfig(name)?;
    let config = dir.join("kubelet.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             cgroupRoot: {}\npodLogsDir: {}\n{}authentication:\n  x509:\n    clientCAFile: {}\n{}",
            runtime.cgroup_parent(),
            dir.join("pod-logs").display(),
            kubelet_tls(cp, ns, name)?,
            cp.pki().ca.cert.display(),
            crate::kubelet::TEST_EVICTION_HARD,
        ),
    )
    .map_err(crate::io_err("write", &config))?;
    let mut cmd = ns.ns().command(paths::workspace_bin("strake-kubelet")?);
    cmd.args([
        format!("--config={}", config.display()),
        format!("--hostname-override={name}"),
        format!("--node-ip={}", ns.ip()),
        format!("--container-runtime-endpoint={}", runtime.endpoint()),
        format!("--root-dir={}", root.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
    ]);
    Daemon::spawn("strake-kubelet", cmd, &dir.join("kubelet.log"))
}

/// The upstream kubelet on `runtime`, under `cgroup_root`.
fn start_upstream_kubelet(
    cp: &ControlPlane,
    ns: &NodeNs,
    name: &str,
    runtime: &NodeRuntime,
    cgroup_root: &KubeletCgroupRoot,
) -> Result<UpstreamKubelet> {
    let kubeconfig = cp.node_kubeconfig(name)?;
    // The launcher's configuration has its own `authentication` block; this one, given later,
    // replaces it whole (the kubelet decodes leniently after a strict failure on the duplicate
    // key) and adds the cluster CA for the API server's client certificate.
    // evictionHard likewise replaces the launcher's 1 % thresholds with absolute ones: a
    // shared test machine's disk is often fuller than 1 %, and evicted pods fail specs for
    // reasons of the bed, not of the node.
    let extra = format!(
        "{}authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: true\n  \
         x509:\n    clientCAFile: {}\nevictionHard:\n  memory.available: 1Mi\n  \
         nodefs.available: 1Mi\n  nodefs.inodesFree: 1%\n  imagefs.available: 1Mi\n  \
         imagefs.inodesFree: 1%\n",
        kubelet_tls(cp, ns, name)?,
        cp.pki().ca.cert.display()
    );
    let endpoint = runtime.endpoint();
    UpstreamKubelet::start(
        ns,
        &upstream_kubelet::Options {
            node_name: name,
            kubeconfig: &kubeconfig,
            runtime_endpoint: &endpoint,
            cgroup_root,
            extra_config: &extra,
        },
    )
}

/// Starts node `name` of `kind`: its runtime, then its kubelet (the proxy comes once the
/// pod CIDRs are known).
async fn start_node(
    cp: &ControlPlane,
    kind: NodeKind,
    index: u8,
    name: &str,
    mirror: SocketAddr,
) -> Result<ClusterNode> {
    let cgroup_root = if kind.strake_kubelet() {
        None
    } else {
        Some(KubeletCgroupRoot::create()?)
    };
    let mut ns = cp.net().add_node(index)?;
    let runtime = start_runtime(kind.runtime(), &mut ns, index, mirror).await?;
    let dir = NodeDir::new()?;
    let kubelet = match &cgroup_root {
        None => NodeKubelet::Strake(start_strake_kubelet(cp, &ns, name, &runtime, dir.path())?),
        Some(root) => NodeKubelet::Upstream(start_upstream_kubelet(cp, &ns, name, &runtime, root)?),
    };
    Ok(ClusterNode {
        kubelet,
        proxy: None,
        runtime,
        ns,
        _cgroup_root: cgroup_root,
        dir,
        name: name.to_string(),
    })
}

/// Starts the node's proxy (strake-proxy or kube-proxy) as upstream's `system:kube-proxy`.
fn start_proxy(cp: &ControlPlane, node: &mut ClusterNode, kind: ProxyKind) -> Result<()> {
    let dir = node.dir().to_path_buf();
    let name = node.name().to_string();
    let certs = cp
        .pki()
        .issue_client(&format!("kube-proxy-{name}"), "system:kube-proxy", &[])?;
    let kubeconfig = dir.join("kube-proxy.kubeconfig");
    cp.pki()
        .write_kubeconfig(&kubeconfig, &cp.cluster_server(), &certs)?;
    let log = dir.join("proxy.log");
    let (program, args) = match kind {
        ProxyKind::StrakeProxyDaemonSet => return Ok(()),
        ProxyKind::KubeProxy => (kube_proxy::binary()?, kube_proxy::args(&name, &kubeconfig)),
        ProxyKind::StrakeProxy => {
            let config = dir.join("kube-proxy.yaml");
            std::fs::write(
                &config,
                format!(
                    "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                     mode: nftables\nclusterCIDR: {POD_CIDR}\n"
                ),
            )
            .map_err(crate::io_err("write", &config))?;
            (
                paths::workspace_bin("strake-proxy")?,
                vec![
                    format!("--kubeconfig={}", kubeconfig.display()),
                    format!("--config={}", config.display()),
                    format!("--hostname-override={name}"),
                ],
            )
        }
    };
    let mut cmd = node.ns().ns().command(program);
    cmd.args(args);
    node.proxy = Some(Daemon::spawn("proxy", cmd, &log)?);
    Ok(())
}

/// The running cluster. Dropping it tears everything down: nodes first, then the registries
/// and the control plane.
pub struct Cluster {
    /// The nodes, in index order.
    pub nodes: Vec<ClusterNode>,
    /// The registry of the strake-proxy image ([`NodeKind::SwapProxy`]).
    pub scratch_registry: Option<ScratchRegistry>,
    /// The conformance image registry.
    pub conformance_registry: ConformanceRegistry,
    /// The test bed's own registries (containerd's sandbox image).
    pub registry: Registry,
    /// The control plane.
    pub cp: ControlPlane,
    /// Node kind.
    pub kind: NodeKind,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Newest node first; each node's own guards order its daemons.
        while let Some(n) = self.nodes.pop() {
            drop(n);
        }
    }
}

impl Cluster {
    /// Starts the control plane, registries, `opts.nodes` nodes with routed pod CIDRs, and
    /// CoreDNS; returns once every node is Ready and CoreDNS is available. `say` narrates.
    pub async fn start(opts: &Options, say: &mut (dyn FnMut(String) + Send)) -> Result<Self> {
        if opts.nodes == 0 || opts.nodes > 20 {
            return Err(Error::Invalid(format!(
                "--nodes {} is outside 1..=20",
                opts.nodes
            )));
        }
        let manifest = coredns_manifest()?;
        say("starting the control plane (aggregator routing, front proxy) ...".into());
        let cp = ControlPlane::start(CpOptions {
            controllers: true,
            aggregator: true,
            ..CpOptions::default()
        })
        .await?;
        let registry = Registry::start(cp.net(), &cp.dir().join("registry"))?;
        let conformance_registry = ConformanceRegistry::start(&cp, &cp.dir().join("registry"))?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            scratch_registry: None,
            conformance_registry,
            registry,
            cp,
            kind: opts.kind,
        };
        let mirror = cluster.conformance_registry.in_cluster();
        for i in 0..opts.nodes {
            let name = format!("{}-node-{i}", opts.kind);
            say(format!("starting {name} ({} node) ...", opts.kind));
            let node = start_node(&cluster.cp, opts.kind, i, &name, mirror).await?;
            cluster.nodes.push(node);
        }
        let cidrs = cluster.wait_pod_cidrs(Duration::from_secs(120)).await?;
        say(format!("pod CIDRs from node IPAM: {cidrs:?}"));
        cluster.network(&cidrs)?;
        for i in 0..cluster.nodes.len() {
            let (cp, node) = (&cluster.cp, &mut cluster.nodes[i]);
            start_proxy(cp, node, opts.kind.proxy())?;
        }
        cluster.wait_nodes_ready(Duration::from_secs(180)).await?;
        if opts.kind.proxy() == ProxyKind::StrakeProxyDaemonSet {
            say("building the strake-proxy image; deploying manifests/proxy/ ...".into());
            cluster.deploy_proxy_daemonset().await?;
        }
        say("all nodes Ready; deploying CoreDNS (upstream's addon manifest) ...".into());
        cluster.deploy_coredns(&manifest).await?;
        say(format!(
            "cluster up: {} {} nodes, CoreDNS at {CLUSTER_DNS}",
            opts.nodes, opts.kind
        ));
        Ok(cluster)
    }

    async fn client(&self) -> Result<kube::Client> {
        self.cp.client().await
    }

    fn check_nodes(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            n.check_running()?;
        }
        Ok(())
    }

    /// Waits until every Node has `spec.podCIDR`; returns (node address, CIDR) in node order.
    async fn wait_pod_cidrs(&mut self, timeout: Duration) -> Result<Vec<(Ipv4Addr, String)>> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no Node yet");
        loop {
            self.check_nodes()?;
            let mut out = Vec::new();
            for n in &self.nodes {
                match nodes.get_opt(n.name()).await {
                    Ok(Some(node)) => match node.spec.and_then(|s| s.pod_cidr) {
                        Some(c) => out.push((n.ns().ip(), c)),
                        None => last = format!("{} has no podCIDR", n.name()),
                    },
                    Ok(None) => last = format!("{} not registered", n.name()),
                    Err(e) => last = e.to_string(),
                }
            }
            if out.len() == self.nodes.len() {
                return Ok(out);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "pod CIDRs of all nodes".into(),
                    secs: timeout.as_secs(),
                    last_error: last,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// kindnet's part: CNI configuration per node, forwarding on, routes between pod CIDRs
    /// (in the node namespaces and in the cluster namespace, where the API server and
    /// e2e.test reach pods).
    fn network(&self, cidrs: &[(Ipv4Addr, String)]) -> Result<()> {
        for (node, (ip, cidr)) in self.nodes.iter().zip(cidrs) {
            let conf_dir = node.cni_conf_dir();
            let file = conf_dir.join("10-strake-testbed.conflist");
            let tmp = conf_dir.join(".10-strake-testbed.conflist.tmp");
            let ipam = node.dir().join("ipam");
            std::fs::write(&tmp, ptp_conflist(cidr, &ipam))
                .map_err(crate::io_err("write", &tmp))?;
            // One rename: the runtime never reads half a file.
            std::fs::rename(&tmp, &file).map_err(crate::io_err("rename", &file))?;
            node.ns()
                .ns()
                .run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
            for (dst, via) in routes_for(*ip, cidrs) {
                node.ns().ns().ip(&[
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &via.to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
        }
        for (ip, cidr) in cidrs {
            self.cp
                .net()
                .ns()
                .ip(&["route", "replace", cidr, "via", &ip.to_string()])?;
        }
        Ok(())
    }

    async fn wait_nodes_ready(&mut self, timeout: Duration) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_nodes()?;
            let mut not_ready = Vec::new();
            for n in &self.nodes {
                let ready = nodes
                    .get_opt(n.name())
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|node| {
                        node.status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                if !ready {
                    not_ready.push(n.name().to_string());
                }
            }
            if not_ready.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "all nodes Ready".into(),
                    secs: timeout.as_secs(),
                    last_error: format!("not Ready: {not_ready:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs `kubectl args...` against the cluster (from the root namespace).
    pub fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        process::run(
            Command::new(paths::kubernetes_bin("kubectl")?)
                .arg(format!("--kubeconfig={}", self.cp.kubeconfig().display()))
                .args(args),
        )
    }

    /// strake-proxy as users run it: its image built by `manifests/proxy/build-image.sh` from
    /// the workspace's binary and pushed to a scratch registry, the manifests of
    /// `manifests/proxy/` applied with the image pointed there, and the API server's address
    /// given as `KUBERNETES_SERVICE_HOST`/`_PORT` (the `kubernetes` Service's ClusterIP is
    /// what the proxy is to program, so it cannot be reached through it yet, as for any
    /// kube-proxy replacement). Returns once every node runs a ready proxy pod.
    async fn deploy_proxy_daemonset(&mut self) -> Result<()> {
        let manifests = repo_root()?.join("manifests/proxy");
        let registry = self.scratch_registry()?;
        process::run(
            Command::new(manifests.join("build-image.sh"))
                .arg(registry.local().to_string())
                .env("STRAKE_PROXY_BIN", paths::workspace_bin("strake-proxy")?),
        )?;
        let version = env!("CARGO_PKG_VERSION");
        let image = format!("{}/strake/strake-proxy:{version}", registry.in_cluster());
        let ds = manifests.join("daemonset.yaml").display().to_string();
        let with_image = self.kubectl(&[
            "set",
            "image",
            "--local",
            "-o",
            "yaml",
            "-f",
            &ds,
            &format!("strake-proxy={image}"),
        ])?;
        let step = self.cp.dir().join("strake-proxy-daemonset.yaml");
        std::fs::write(&step, &with_image.stdout).map_err(crate::io_err("write", &step))?;
        let with_env = self.kubectl(&[
            "set",
            "env",
            "--local",
            "-o",
            "yaml",
            "-f",
            &step.display().to_string(),
            &format!("KUBERNETES_SERVICE_HOST={CLUSTER_GATEWAY}"),
            &format!(
                "KUBERNETES_SERVICE_PORT={}",
                crate::control_plane::APISERVER_PORT
            ),
        ])?;
        std::fs::write(&step, &with_env.stdout).map_err(crate::io_err("write", &step))?;
        for file in [
            "serviceaccount.yaml",
            "clusterrole.yaml",
            "clusterrolebinding.yaml",
            "configmap.yaml",
        ] {
            self.kubectl(&["apply", "-f", &manifests.join(file).display().to_string()])?;
        }
        self.kubectl(&["apply", "-f", &step.display().to_string()])?;
        let daemonsets: Api<k8s_openapi::api::apps::v1::DaemonSet> =
            Api::namespaced(self.client().await?, "kube-system");
        let want = self.nodes.len() as i32;
        let timeout = Duration::from_secs(120);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_nodes()?;
            let ready = daemonsets
                .get_opt("strake-proxy")
                .await
                .ok()
                .flatten()
                .and_then(|d| d.status)
                .map_or(0, |s| s.number_ready);
            if ready >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.timed_out(
                    "the strake-proxy DaemonSet ready on every node".into(),
                    timeout,
                    &[
                        &["-n", "kube-system", "get", "pods", "-o", "wide"][..],
                        &["-n", "kube-system", "get", "events"][..],
                    ],
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A timeout waiting for `what`, with what `kubectl` says of each of `diagnostics` (the
    /// pods, events, logs that tell why) as its last error.
    fn timed_out(&self, what: String, timeout: Duration, diagnostics: &[&[&str]]) -> Error {
        let mut why = String::new();
        for args in diagnostics {
            if let Ok(o) = self.kubectl(args) {
                why.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        Error::Timeout {
            what,
            secs: timeout.as_secs(),
            last_error: why,
        }
    }

    /// The writable registry for images built during the run, started on first use.
    fn scratch_registry(&mut self) -> Result<&ScratchRegistry> {
        if self.scratch_registry.is_none() {
            let dir = self.cp.dir().join("scratch-registry");
            self.scratch_registry = Some(ScratchRegistry::start(self.cp.net(), &dir)?);
        }
        self.scratch_registry
            .as_ref()
            .ok_or_else(|| Error::Invalid("no scratch registry".into()))
    }

    /// metrics-server as its own `manifests/base` deploys it (the pinned release, built by
    /// `build-conformance.sh`, its image pushed to the scratch registry), so that `kubectl top`
    /// works: it scrapes every kubelet's `/metrics/resource` over the kubelets' serving
    /// certificates (of the cluster CA, which it trusts through its service account) and
    /// serves `metrics.k8s.io` through the aggregator. Returns once the APIService is
    /// Available.
    pub async fn deploy_metrics_server(&mut self) -> Result<()> {
        let version = pinned("METRICS_SERVER_VERSION");
        let manifests = existing(
            paths::cache_dir()
                .join(format!("metrics-server-{version}"))
                .join("manifests"),
            "make conformance-bed",
        )?;
        let registry = self.scratch_registry()?;
        process::run(
            Command::new(repo_root()?.join("integration/testbed/push-metrics-server.sh"))
                .arg(registry.local().to_string()),
        )?;
        let image = format!(
            "{}/metrics-server/metrics-server:{version}",
            registry.in_cluster()
        );
        // An overlay naming our image, as a user would deploy it from another registry.
        let overlay = self.cp.dir().join("metrics-server");
        let base = overlay.join("base");
        std::fs::create_dir_all(&base).map_err(crate::io_err("create", &base))?;
        for e in std::fs::read_dir(&manifests).map_err(crate::io_err("read", &manifests))? {
            let e = e.map_err(crate::io_err("read", &manifests))?;
            let to = base.join(e.file_name());
            std::fs::copy(e.path(), &to).map_err(crate::io_err("copy to", &to))?;
        }
        let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
        let kustomization = overlay.join("kustomization.yaml");
        std::fs::write(
            &kustomization,
            format!(
                "resources:\n- base\nimages:\n- name: gcr.io/k8s-staging-metrics-server/metrics-server\n  \
                 newName: {name}\n  newTag: {tag}\n"
            ),
        )
        .map_err(crate::io_err("write", &kustomization))?;
        self.kubectl(&["apply", "-k", &overlay.display().to_string()])?;
        let timeout = Duration::from_secs(180);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_nodes()?;
            let available = self
                .kubectl(&[
                    "get",
                    "apiservice",
                    "v1beta1.metrics.k8s.io",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
                ])
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "True")
                .unwrap_or(false);
            if available {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.timed_out(
                    "metrics-server's APIService Available".into(),
                    timeout,
                    &[
                        &["-n", "kube-system", "get", "pods", "-o", "wide"][..],
                        &[
                            "-n",
                            "kube-system",
                            "logs",
                            "deployment/metrics-server",
                            "--tail=30",
                        ][..],
                        &["get", "apiservice", "v1beta1.metrics.k8s.io", "-o", "yaml"][..],
                    ],
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn deploy_coredns(&mut self, manifest: &Path) -> Result<()> {
        let base = std::fs::read_to_string(manifest).map_err(crate::io_err("read", manifest))?;
        let filled = self.cp.dir().join("coredns.yaml");
        std::fs::write(&filled, fill_coredns_manifest(&base))
            .map_err(crate::io_err("write", &filled))?;
        self.kubectl(&["apply", "-f", &filled.display().to_string()])?;
        let deployments: Api<Deployment> = Api::namespaced(self.client().await?, "kube-system");
        let timeout = Duration::from_secs(180);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_nodes()?;
            let d = deployments.get_opt("coredns").await.ok().flatten();
            let available = d
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            if available >= 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.timed_out(
                    "CoreDNS available".into(),
                    timeout,
                    &[
                        &["-n", "kube-system", "get", "pods", "-o", "wide"][..],
                        &["-n", "kube-system", "get", "events"][..],
                        &[
                            "get",
                            "nodes",
                            "-o",
                            "custom-columns=NAME:.metadata.name,TAINTS:.spec.taints",
                        ][..],
                    ],
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Shell exports for using the cluster by hand.
    pub fn env(&self) -> String {
        format!(
            "export KUBECONFIG={kc}\nexport STRAKE_CLUSTER_KUBECONFIG={ckc}\n\
             export STRAKE_CLUSTER_NETNS=/run/netns/{ns}\nexport CONFORMANCE_REGISTRY={reg}\n",
            kc = self.cp.kubeconfig().display(),
            ckc = self.cp.cluster_kubeconfig().display(),
            ns = self.cp.net().ns().name(),
            reg = self.conformance_registry.local(),
        )
    }

    /// Copies every daemon's log into `dir` (`<node>-<daemon>.log`, `control-plane-*.log`).
    pub fn collect_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(crate::io_err("create", dir))?;
        for n in &self.nodes {
            for (what, path) in n.logs() {
                let _ = std::fs::copy(&path, dir.join(format!("{}-{what}.log", n.name())));
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.cp.dir()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let name = format!("control-plane-{}", e.file_name().to_string_lossy());
                    let _ = std::fs::copy(&p, dir.join(name));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_kind_parses_and_prints() {
        assert_eq!("strake".parse::<NodeKind>().unwrap(), NodeKind::Strake);
        assert_eq!("upstream".parse::<NodeKind>().unwrap(), NodeKind::Upstream);
        assert!("containerd".parse::<NodeKind>().is_err());
        assert_eq!(NodeKind::Upstream.to_string(), "upstream");
        for k in NodeKind::ALL {
            assert_eq!(k.to_string().parse::<NodeKind>().unwrap(), k);
        }
        // Each mix replaces exactly one upstream daemon.
        let strake_parts = |k: NodeKind| {
            [
                k.runtime() == RuntimeKind::Strake,
                k.strake_kubelet(),
                k.proxy() != ProxyKind::KubeProxy,
            ]
            .iter()
            .filter(|x| **x)
            .count()
        };
        assert_eq!(strake_parts(NodeKind::Strake), 3);
        assert_eq!(strake_parts(NodeKind::Upstream), 0);
        for k in [
            NodeKind::SwapRuntime,
            NodeKind::SwapKubelet,
            NodeKind::SwapProxy,
        ] {
            assert_eq!(strake_parts(k), 1, "{k}");
        }
    }

    #[test]
    fn routes_go_to_the_other_nodes_only() {
        let a = Ipv4Addr::new(10, 213, 0, 10);
        let b = Ipv4Addr::new(10, 213, 0, 11);
        let c = Ipv4Addr::new(10, 213, 0, 12);
        let nodes = vec![
            (a, "10.244.0.0/24".to_string()),
            (b, "10.244.1.0/24".to_string()),
            (c, "10.244.2.0/24".to_string()),
        ];
        assert_eq!(
            routes_for(b, &nodes),
            vec![
                ("10.244.0.0/24".to_string(), a),
                ("10.244.2.0/24".to_string(), c)
            ]
        );
    }

    #[test]
    fn ptp_conflist_is_kindnets() {
        let v: serde_json::Value =
            serde_json::from_str(&ptp_conflist("10.244.3.0/24", Path::new("/x/ipam"))).unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "ptp");
        assert_eq!(plugins[0]["ipam"]["type"], "host-local");
        assert_eq!(
            plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/x/ipam");
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn coredns_manifest_holes_are_filled() {
        let base = "kubernetes __DNS__DOMAIN__ in-addr.arpa\nclusterIP: __DNS__SERVER__\nmemory: __DNS__MEMORY__LIMIT__\n";
        let filled = fill_coredns_manifest(base);
        assert_eq!(
            filled,
            "kubernetes cluster.local in-addr.arpa\nclusterIP: 10.96.0.10\nmemory: 170Mi\n"
        );
    }

    #[test]
    fn coredns_version_is_pinned() {
        assert!(pinned("COREDNS_VERSION").starts_with("v1."));
        assert!(pinned("KUBERNETES_VERSION").starts_with("v1."));
    }
}
