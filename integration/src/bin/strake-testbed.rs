//! `strake-testbed`: the test bed on the command line.
//!
//! - `strake-testbed up`: starts a control plane and the local registries, writes their
//!   coordinates to `/run/strake-testbed/env` (read by `make testbed-env`) and keeps them running
//!   until interrupted, then removes everything it made.
//! - `strake-testbed demo [--keep]`: a whole Strake node (strake-runtime, strake-kubelet,
//!   strake-proxy) serving a Deployment behind a Service on the test bed (`make demo`; see
//!   `strake_integration::demo`).
//! - `strake-testbed forward`: the loopback forwarder the test bed starts inside a namespace
//!   (see `strake_integration::forward`); not meant to be run by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
