//! `strake-testbed`: the test bed on the command line.
//!
//! - `strake-testbed up`: starts a control plane and the local registries, writes their
//!   coordinates to `/run/strake-testbed/env` (read by `make testbed-env`) and keeps them running
//!   until interrupted, then removes everything it made.
//! - `strake-testbed demo [--keep]`: a whole Strake node (strake-runtime, strake-kubelet,
//!   strake-proxy) serving a Deployment behind a Service on the test bed (`make demo`; see
//!   `strake_integration::demo`).
//! - `strake-testbed cluster --nodes N [--node-kind K] [--keep]`: a multi-node
//!   cluster (control plane with aggregator routing, CoreDNS, N nodes with routed pod CIDRs; see
//!   `strake_integration::cluster`); prints its environment, then tears it down (or keeps it
//!   until Ctrl-C with `--keep`).
//! - `strake-testbed conformance --nodes N --node-kind K --set all|node-network --report-dir D`:
//!   upstream's e2e.test `[Conformance]` specs on such a cluster (`make conformance`; see
//!   `strake_integration::conformance`), ending with the line
//!   `conformance: P passed, F failed, S skipped of T`.
//! - `strake-testbed forward`: the loopback forwarder the test bed starts inside a namespace
//!   (see `strake_integration::forward`); not meant to be run by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use strake_integration::cluster::{self, Cluster, NodeKind};
use strake_integration::conformance::{self, RunOptions, SpecSet};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;

#[derive(Parser)]
#[command(
    name = "strake-testbed",
    about = "Strake's test bed: a real control plane and registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a control plane and the local registries; stop them on Ctrl-C or SIGTERM.
    Up {
        /// Only etcd and kube-apiserver (no controller-manager, no scheduler).
        #[arg(long)]
        no_controllers: bool,
        /// Where to write the environment file.
        #[arg(long, default_value = "/run/strake-testbed/env")]
        env_file: PathBuf,
    },
    /// Run a Strake node on the test bed and serve a Deployment behind a Service through it.
    Demo {
        /// Keep everything running after the demo until Ctrl-C or SIGTERM.
        #[arg(long)]
        keep: bool,
    },
    /// Start a multi-node cluster (control plane, CoreDNS, N nodes).
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// strake (strake-runtime, strake-kubelet, strake-proxy), upstream (containerd,
        /// kubelet, kube-proxy), or a swap-in mix: swap-runtime (kubelet on strake-runtime),
        /// swap-kubelet (strake-kubelet on containerd), swap-proxy (upstream nodes with
        /// strake-proxy as a DaemonSet).
        #[arg(long, default_value = "strake")]
        node_kind: NodeKind,
        /// Keep the cluster running until Ctrl-C or SIGTERM.
        #[arg(long)]
        keep: bool,
    },
    /// Run upstream's [Conformance] specs (e2e.test through ginkgo) on a new cluster.
    Conformance {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// strake, upstream, swap-runtime, swap-kubelet or swap-proxy (see `cluster`).
        #[arg(long, default_value = "strake")]
        node_kind: NodeKind,
        /// all (every [Conformance] spec) or node-network ([sig-node] and [sig-network] ones).
        #[arg(long, default_value = "node-network")]
        set: SpecSet,
        /// Parallel ginkgo processes (the [Serial] specs run one at a time after them).
        #[arg(long, default_value_t = 4)]
        procs: u32,
        /// Narrow the selection further (a regular expression on spec texts).
        #[arg(long)]
        focus: Option<String>,
        /// Where junit and JSON reports, the ginkgo logs and the daemons' logs go.
        #[arg(long)]
        report_dir: PathBuf,
    },
    /// Forward connections accepted on the inherited descriptor 3 to an address.
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        connect: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The control plane's readiness poll logs every refused attempt as an error.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Forward { connect } => Ok(strake_integration::forward::serve(connect)?),
        Cmd::Up {
            no_controllers,
            env_file,
        } => up(!no_controllers, env_file),
        Cmd::Demo { keep } => demo(keep),
        Cmd::Cluster {
            nodes,
            node_kind,
            keep,
        } => cluster(nodes, node_kind, keep),
        Cmd::Conformance {
            nodes,
            node_kind,
            set,
            procs,
            focus,
            report_dir,
        } => conformance(
            &cluster::Options {
                nodes,
                kind: node_kind,
            },
            &RunOptions {
                set,
                procs,
                focus,
                report_dir,
            },
        ),
    }
}

fn demo(keep: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut out = std::io::stdout();
        let (demo, _report) = strake_integration::demo::run(&mut out).await?;
        if keep {
            println!(
                "\nstill running; in another shell:\n  export KUBECONFIG={}\n  \
                 kubectl get nodes,pods,svc -o wide\nCtrl-C to stop",
                demo.cp.kubeconfig().display()
            );
            wait_for_signal().await?;
        }
        println!("tearing down ...");
        drop(demo);
        anyhow::Ok(())
    })
}

fn narrate(started: std::time::Instant) -> impl FnMut(String) + Send {
    move |line| eprintln!("[{:6.1}s] {line}", started.elapsed().as_secs_f64())
}

fn cluster(nodes: u8, kind: NodeKind, keep: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut say = narrate(std::time::Instant::now());
        let c = Cluster::start(&cluster::Options { nodes, kind }, &mut say).await?;
        print!("{}", c.env());
        let pods = c.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"])?;
        print!("{}", String::from_utf8_lossy(&pods.stdout));
        if keep {
            eprintln!("cluster running; Ctrl-C to stop");
            wait_for_signal().await?;
        }
        eprintln!("tearing down ...");
        drop(c);
        anyhow::Ok(())
    })
}

fn conformance(copts: &cluster::Options, ropts: &RunOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let started = std::time::Instant::now();
    let summary = rt.block_on(async {
        let mut say = narrate(started);
        let c = Cluster::start(copts, &mut say).await?;
        // SIGTERM or Ctrl-C stops the specs; the cluster is then torn down as after a run.
        tokio::spawn(async {
            if wait_for_signal().await.is_ok() {
                eprintln!("stopping the conformance run ...");
                conformance::stop();
            }
        });
        let ro = ropts.clone();
        // ginkgo runs for a long time: off the async runtime. The cluster stays owned here.
        let result =
            tokio::task::block_in_place(|| conformance::run(&c, &ro, &mut std::io::stderr()));
        if let Err(e) = c.collect_logs(&ropts.report_dir.join("logs")) {
            eprintln!("cannot collect logs: {e}");
        }
        say("tearing down the cluster ...".into());
        drop(c);
        anyhow::Ok(result?)
    })?;
    let elapsed = started.elapsed().as_secs();
    for (spec, msg) in &summary.failures {
        println!("FAILED {spec}\n    {msg}");
    }
    println!(
        "reports in {} ({} nodes, {}, {} min)",
        ropts.report_dir.display(),
        copts.nodes,
        copts.kind,
        elapsed / 60
    );
    println!("{}", summary.line());
    if summary.failed > 0 || summary.passed == 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

fn up(controllers: bool, env_file: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        eprintln!("starting control plane (controllers: {controllers}) ...");
        let cp = ControlPlane::start(Options {
            controllers,
            ..Options::default()
        })
        .await?;
        let registry = Registry::start(cp.net(), &cp.dir().join("registry"))?;
        let env = format!(
            "export STRAKE_TESTBED_PID={pid}\n\
             export KUBECONFIG={kc}\n\
             export STRAKE_CLUSTER_KUBECONFIG={ckc}\n\
             export STRAKE_CLUSTER_NETNS=/run/netns/{ns}\n\
             export REGISTRY={reg}\n\
             export REGISTRY_PROTECTED={preg}\n\
             export REGISTRY_IN_CLUSTER={creg}\n\
             export REGISTRY_PROTECTED_IN_CLUSTER={cpreg}\n\
             export REGISTRY_CREDENTIALS={user}:{pass}\n",
            pid = std::process::id(),
            kc = cp.kubeconfig().display(),
            ckc = cp.cluster_kubeconfig().display(),
            ns = cp.net().ns().name(),
            reg = registry.open_local(),
            preg = registry.protected_local(),
            creg = registry.open_in_cluster(),
            cpreg = registry.protected_in_cluster(),
            user = strake_integration::registry::USER,
            pass = strake_integration::registry::PASSWORD,
        );
        if let Some(parent) = env_file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&env_file, &env).with_context(|| format!("write {}", env_file.display()))?;
        print!("{env}");
        eprintln!(
            "test bed up (logs in {}); Ctrl-C to stop",
            cp.dir().display()
        );
        wait_for_signal().await?;
        eprintln!("stopping ...");
        let _ = std::fs::remove_file(&env_file);
        drop(registry);
        drop(cp);
        anyhow::Ok(())
    })
}
