//! A real Kubernetes control plane for tests: etcd, kube-apiserver and, on request,
//! kube-controller-manager and kube-scheduler, inside the cluster network namespace.
//!
//! Each instance has its own namespace, data directory and certificates, so suites run side by
//! side with the same in-namespace ports. The root namespace reaches the API server through a
//! loopback [`Forward`]; node namespaces reach it at `https://10.213.0.1:6443`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::forward::Forward;
use crate::netns::{CLUSTER_GATEWAY, ClusterNet};
use crate::paths;
use crate::pki::Pki;
use crate::process::Daemon;
use crate::{Error, Result};

/// The API server's port inside the cluster namespace.
pub const APISERVER_PORT: u16 = 6443;
/// The Service CIDR; its first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The cluster's Pod CIDR, from which controller-manager gives each Node a /24.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Also run kube-controller-manager and kube-scheduler (needed for Deployments, scheduling,
    /// node lifecycle, service-account tokens).
    pub controllers: bool,
    /// How long to wait for `/readyz`.
    pub ready_timeout: Duration,
    /// controller-manager's `--node-monitor-grace-period` (upstream default when `None`);
    /// tests of node lifecycle shorten it to keep their run time down.
    pub node_monitor_grace_period: Option<Duration>,
    /// Serve aggregated APIs as upstream clusters do: front-proxy (request-header) flags with a
    /// `front-proxy-client` certificate, and `--enable-aggregator-routing` (the API server
    /// reaches an APIService's endpoints directly, as the cluster namespace runs no proxy).
    pub aggregator: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            controllers: true,
            ready_timeout: Duration::from_secs(120),
            node_monitor_grace_period: None,
            aggregator: false,
        }
    }
}

/// A running control plane. Dropping it stops every process (by PID, newest first) and removes
/// its namespace and data directory.
pub struct ControlPlane {
    // Field order is drop order: processes first, then the namespace, then the files.
    forward: Option<Forward>,
    daemons: Vec<Daemon>,
    net: ClusterNet,
    pki: Pki,
    admin_kubeconfig: PathBuf,
    cluster_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir.path())
            .field("ns", &self.net.ns().name())
            .finish_non_exhaustive()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.forward.take();
        while let Some(mut d) = self.daemons.pop() {
            d.stop(Duration::from_secs(10));
        }
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl ControlPlane {
    /// Starts a control plane in a new cluster network and waits until `/readyz` says ok.
    pub async fn start(opts: Options) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("strake-cp-")
            .tempdir()
            .map_err(crate::io_err("create", std::env::temp_dir()))?;
        let net = ClusterNet::create()?;
        let pki = Pki::generate(
            &dir.path().join("pki"),
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(CLUSTER_GATEWAY),
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            ],
        )?;
        let mut cp = ControlPlane {
            forward: None,
            daemons: Vec::new(),
            admin_kubeconfig: dir.path().join("admin.kubeconfig"),
            cluster_kubeconfig: dir.path().join("admin-in-cluster.kubeconfig"),
            net,
            pki,
            dir,
        };
        cp.start_etcd()?;
        cp.start_apiserver(opts.aggregator)?;
        let fwd = Forward::start(
            cp.net.ns(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, APISERVER_PORT)),
            &cp.log("forward-apiserver"),
        )?;
        cp.pki.write_kubeconfig(
            &cp.admin_kubeconfig,
            &format!("https://{}", fwd.local_addr()),
            &cp.pki.admin,
        )?;
        cp.forward = Some(fwd);
        cp.pki
            .write_kubeconfig(&cp.cluster_kubeconfig, &cp.cluster_server(), &cp.pki.admin)?;
        cp.wait_ready(opts.ready_timeout).await?;
        if opts.controllers {
            cp.start_controllers(opts.node_monitor_grace_period)?;
        }
        Ok(cp)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn(&mut self, name: &str, program: &Path, args: Vec<String>) -> Result<()> {
        let mut cmd = self.net.ns().command(program);
        cmd.args(args);
        let log = self.log(name);
        self.daemons.push(Daemon::spawn(name, cmd, &log)?);
        Ok(())
    }

    fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.path().join("etcd");
        let args = vec![
            "--name=strake-testbed".into(),
            format!("--data-dir={}", s(&data)),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=strake-testbed=http://127.0.0.1:2380".into(),
            // Test data is thrown away: durability costs time for nothing here.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        self.spawn("etcd", &paths::etcd_bin()?, args)
    }

    fn start_apiserver(&mut self, aggregator: bool) -> Result<()> {
        let front_proxy = if aggregator {
            // One CA for clients and the front proxy: the request-header authenticator only
            // believes the certificate named in --requestheader-allowed-names.
            Some(
                self.pki
                    .issue_client("front-proxy-client", "front-proxy-client", &[])?,
            )
        } else {
            None
        };
        let p = &self.pki;
        let mut args = vec![
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--secure-port={APISERVER_PORT}"),
            // Inside the cluster namespace: its loopback and the cluster bridge only.
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={CLUSTER_GATEWAY}"),
            format!("--cert-dir={}", s(&self.dir.path().join("apiserver-certs"))),
            format!("--tls-cert-file={}", s(&p.apiserver.cert)),
            format!("--tls-private-key-file={}", s(&p.apiserver.key)),
            format!("--client-ca-file={}", s(&p.ca.cert)),
            format!(
                "--kubelet-client-certificate={}",
                s(&p.apiserver_kubelet_client.cert)
            ),
            format!(
                "--kubelet-client-key={}",
                s(&p.apiserver_kubelet_client.key)
            ),
            format!("--kubelet-certificate-authority={}", s(&p.ca.cert)),
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", s(&p.service_account_pub)),
            format!(
                "--service-account-signing-key-file={}",
                s(&p.service_account_key)
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        if let Some(fp) = front_proxy {
            args.extend([
                format!("--requestheader-client-ca-file={}", s(&p.ca.cert)),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!("--proxy-client-cert-file={}", s(&fp.cert)),
                format!("--proxy-client-key-file={}", s(&fp.key)),
                "--enable-aggregator-routing=true".into(),
            ]);
        }
        self.spawn(
            "kube-apiserver",
            &paths::kubernetes_bin("kube-apiserver")?,
            args,
        )
    }

    fn start_controllers(&mut self, grace: Option<Duration>) -> Result<()> {
        let kubeconfig = s(&self.cluster_kubeconfig);
        let p = &self.pki;
        let mut cm = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                s(&p.service_account_key)
            ),
            format!("--root-ca-file={}", s(&p.ca.cert)),
            format!("--cluster-signing-cert-file={}", s(&p.ca.cert)),
            format!("--cluster-signing-key-file={}", s(&p.ca.key)),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={POD_CIDR}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--node-cidr-mask-size=24".into(),
            "--profiling=false".into(),
        ];
        if let Some(g) = grace {
            cm.push(format!("--node-monitor-grace-period={}s", g.as_secs()));
        }
        self.spawn(
            "kube-controller-manager",
            &paths::kubernetes_bin("kube-controller-manager")?,
            cm,
        )?;
        let sched = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ];
        self.spawn(
            "kube-scheduler",
            &paths::kubernetes_bin("kube-scheduler")?,
            sched,
        )
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_error = String::from("no answer yet");
        let client = self.client().await?;
        while tokio::time::Instant::now() < deadline {
            for d in &mut self.daemons {
                d.check_running()?;
            }
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => match client.request_text(req).await {
                    Ok(body) if body.trim() == "ok" => return Ok(()),
                    Ok(body) => last_error = body,
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(Error::Timeout {
            what: "kube-apiserver /readyz".into(),
            secs: timeout.as_secs(),
            last_error,
        })
    }

    /// A client with cluster-admin rights, from the root namespace.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// Admin kubeconfig usable from the root namespace (via the loopback forwarder).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Admin kubeconfig usable from inside node namespaces (server `https://10.213.0.1:6443`).
    pub fn cluster_kubeconfig(&self) -> &Path {
        &self.cluster_kubeconfig
    }

    /// The API server URL as node namespaces see it.
    pub fn cluster_server(&self) -> String {
        format!("https://{CLUSTER_GATEWAY}:{APISERVER_PORT}")
    }

    /// The cluster network the control plane listens in (add nodes to it).
    pub fn net(&self) -> &ClusterNet {
        &self.net
    }

    /// The PKI (to issue node or user certificates).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The control plane's working directory (logs, data, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PIDs of the processes this control plane started.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons.iter().map(Daemon::pid).collect()
    }

    /// Writes a kubeconfig for node `node_name` (`system:node:<name>` in `system:nodes`),
    /// pointing at the in-cluster API server address.
    pub fn node_kubeconfig(&self, node_name: &str) -> Result<PathBuf> {
        let files = self.pki.issue_client(
            &format!("node-{node_name}"),
            &format!("system:node:{node_name}"),
            &["system:nodes"],
        )?;
        let path = self.dir.path().join(format!("node-{node_name}.kubeconfig"));
        self.pki
            .write_kubeconfig(&path, &self.cluster_server(), &files)?;
        Ok(path)
    }
}

/// A Kubernetes client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Client {
        kubeconfig: kubeconfig.to_path_buf(),
        source,
    };
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| err(Box::new(e)))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| err(Box::new(e)))?;
    kube::Client::try_from(config).map_err(|e| err(Box::new(e)))
}
