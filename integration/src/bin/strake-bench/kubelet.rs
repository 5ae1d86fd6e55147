//! `strake-bench kubelet [--pods 30,100] [--steady-secs 60] [--concurrency 10] [--runs 3]
//! [--logs DIR] [--only kubelet|strake-kubelet]`: strake-kubelet versus the upstream kubelet
//! (the test bed's build of the pinned release), issue #5's benchmark. `--runs N` measures each
//! kubelet N times, alternating which goes first, and reports min / median / max with the
//! ratio of the medians. `--logs DIR` keeps each kubelet's log; `--only` measures one of them.
//!
//! One control plane (etcd, kube-apiserver, controller-manager, scheduler) and one local
//! registry serve both kubelets, one after the other. Each kubelet gets a fresh node namespace
//! (a deleted namespace's veth vanishes asynchronously) and a fresh containerd (Debian's, the
//! test bed's [`Containerd`]) with `strake/busybox:1` and the pause image pulled beforehand,
//! so no run pays for a pull. The upstream kubelet is launched by
//! [`strake_integration::upstream_kubelet`] (what it had to be kept from changing on the host
//! is listed there); strake-kubelet by a small launcher here. Both run with their defaults
//! apart from paths, the cgroup root and, for upstream, the host protections.
//!
//! For each pod count N, N pods (busybox `sleep`, the namespace's default service account
//! token mounted as usual) are created with `spec.nodeName` set, so the scheduler plays no
//! part, at most `--concurrency` creates in flight. A pod's startup latency is from the moment
//! its create request was sent (the server's `creationTimestamp` has a resolution of one
//! second) to the moment a watch (started and synced before the first create) delivers the pod
//! with phase `Running`. p50 and p99 are nearest-rank percentiles.
//!
//! With the largest N running, after 10 s to settle, the kubelet process's RSS (`VmRSS`, sampled
//! every second) and CPU time (`utime + stime` from `/proc/<pid>/stat`) are taken over
//! `--steady-secs`. Its RSS when the node is Ready with no pods and its peak RSS (`VmHWM`) are
//! reported too. The pods are deleted between counts, and the run waits until they are gone.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use strake_integration::containerd::{Containerd, unmount_below};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::netns::NodeNs;
use strake_integration::process::Daemon;
use strake_integration::registry::Registry;
use strake_integration::upstream_kubelet::{self, KubeletCgroupRoot, UpstreamKubelet};
use tokio::time::Instant;

const NAMESPACE: &str = "bench";
const SETTLE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Upstream,
    Strake,
}

impl Kind {
    fn node_name(self) -> &'static str {
        match self {
            Kind::Upstream => "bench-kubelet",
            Kind::Strake => "bench-strake-kubelet",
        }
    }
}

/// strake-kubelet (this workspace's build, next to `strake-bench`) in a node namespace, with
/// upstream's defaults apart from paths and the cgroup root. Dropping it stops it and unmounts
/// what it mounted below its directory.
struct StrakeKubelet {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
}

impl StrakeKubelet {
    fn start(
        node: &NodeNs,
        name: &str,
        kubeconfig: &Path,
        containerd: &Containerd,
    ) -> anyhow::Result<Self> {
        let bin = strake_integration::paths::workspace_bin("strake-kubelet")?;
        let dir = tempfile::Builder::new()
            .prefix("strake-bench-kubelet-")
            .tempdir()?;
        let d = dir.path();
        let config = d.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 cgroupRoot: {}\npodLogsDir: {}\n{}",
                containerd.cgroup_parent(),
                d.join("pod-logs").display(),
                strake_integration::kubelet::TEST_EVICTION_HARD
            ),
        )?;
        let mut cmd = node.ns().command(bin);
        cmd.args([
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={}", node.ip()),
            format!("--container-runtime-endpoint={}", containerd.endpoint()),
            format!("--root-dir={}", d.join("root").display()),
        ]);
        let daemon = Daemon::spawn("strake-kubelet", cmd, &d.join("kubelet.log"))?;
        Ok(StrakeKubelet {
            daemon: Some(daemon),
            dir,
        })
    }
}

impl Drop for StrakeKubelet {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
        unmount_below(self.dir.path());
    }
}

enum Kubelet {
    Upstream(UpstreamKubelet),
    Strake(StrakeKubelet),
}

impl Kubelet {
    fn pid(&self) -> u32 {
        match self {
            Kubelet::Upstream(k) => k.pid(),
            Kubelet::Strake(k) => k.daemon.as_ref().map(Daemon::pid).unwrap_or(0),
        }
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        match self {
            Kubelet::Upstream(k) => k.check_running()?,
            Kubelet::Strake(k) => {
                if let Some(d) = k.daemon.as_mut() {
                    d.check_running()?;
                }
            }
        }
        Ok(())
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn pod(name: &str, run: &str, node: &str, image: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "strake-bench": run } },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sleep", "3600"]
            }]
        }
    }))?)
}

async fn wait_node_ready(
    client: &kube::Client,
    name: &str,
    kubelet: &mut Kubelet,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        kubelet.check_running()?;
        let ready = nodes.get_opt(name).await.ok().flatten().is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("node {name} not Ready after 180 s")
}

/// Creates `n` pods on `node` and returns each one's startup latency, sorted.
async fn start_pods(
    client: &kube::Client,
    kubelet: &mut Kubelet,
    node: &str,
    run: &str,
    n: usize,
    concurrency: usize,
    image: &str,
) -> anyhow::Result<Vec<Duration>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let cfg = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&format!("strake-bench={run}"));
    let watch = {
        let running = running.clone();
        let stream = watcher(pods.clone(), cfg);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut synced = Some(synced_tx);
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                        if phase == Some("Running")
                            && let Some(name) = p.metadata.name
                            && let Ok(mut m) = running.lock()
                        {
                            m.entry(name).or_insert(now);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("  watch: {e}"),
                }
            }
        })
    };
    let _abort = AbortOnDrop(watch);
    tokio::time::timeout(Duration::from_secs(60), synced_rx)
        .await
        .context("pod watch did not sync in 60 s")??;

    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..n {
        let name = format!("{run}-{i}");
        let body = pod(&name, run, node, image)?;
        let pods = pods.clone();
        let permit = limit.clone().acquire_owned().await?;
        creates.spawn(async move {
            let sent = Instant::now();
            let r = pods.create(&PostParams::default(), &body).await;
            drop(permit);
            r.map(|_| (name, sent))
        });
    }
    let mut sent = HashMap::new();
    while let Some(r) = creates.join_next().await {
        let (name, at) = r?.context("create pod")?;
        sent.insert(name, at);
    }

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        kubelet.check_running()?;
        let done = running.lock().map(|m| m.len()).unwrap_or(0);
        if done >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} pods Running after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let running = running.lock().map(|m| m.clone()).unwrap_or_default();
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(name, at)| Some(running.get(name)?.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    Ok(latencies)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn delete_pods(client: &kube::Client, run: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let lp = ListParams::default().labels(&format!("strake-bench={run}"));
    pods.delete_collection(&DeleteParams::default(), &lp)
        .await
        .context("delete pods")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if pods.list(&lp).await.is_ok_and(|l| l.items.is_empty()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("pods of {run} still present after 300 s")
}

#[derive(Debug, Default)]
struct Steady {
    rss_mean_kib: u64,
    cpu_percent: f64,
}

/// RSS sampled every second and CPU time over `secs`, of `pid`.
async fn steady_state(kubelet: &mut Kubelet, secs: u64) -> anyhow::Result<Steady> {
    let pid = kubelet.pid();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    let mut samples = Vec::new();
    for _ in 0..secs.max(1) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        kubelet.check_running()?;
        samples.push(status_kib(pid, "VmRSS:"));
    }
    let ticks = cpu_ticks(pid).saturating_sub(c0) as f64;
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(Steady {
        rss_mean_kib: samples.iter().sum::<u64>() / samples.len().max(1) as u64,
        cpu_percent: 100.0 * ticks / clock_ticks_per_sec() / elapsed,
    })
}

#[derive(Debug, Default)]
struct Figures {
    /// (pods, sorted latencies)
    startup: Vec<(usize, Vec<Duration>)>,
    idle_rss_kib: u64,
    steady: Steady,
    hwm_kib: u64,
}

struct Settings {
    counts: Vec<usize>,
    /// Measurements of each kubelet, the order alternating (`--runs`).
    runs: usize,
    /// Where to copy each kubelet's log (`--logs DIR`).
    logs: Option<std::path::PathBuf>,
    steady_secs: u64,
    concurrency: usize,
}

async fn measure(
    kind: Kind,
    index: u8,
    cp: &ControlPlane,
    client: &kube::Client,
    registry: &str,
    settings: &Settings,
) -> anyhow::Result<Figures> {
    let name = kind.node_name();
    // Declared in reverse drop order: the kubelet goes first, then containerd (which removes
    // any pod left), the namespace, and last the upstream kubelet's cgroup root.
    let cgroup_root = match kind {
        Kind::Upstream => Some(KubeletCgroupRoot::create()?),
        Kind::Strake => None,
    };
    let mut ns = cp.net().add_node(index)?;
    let containerd = Containerd::start(&mut ns, index).await?;
    let image = format!("{registry}/strake/busybox:1");
    // The sandbox image containerd is configured with.
    let pause = format!("{registry}/strake/pause:1");
    containerd
        .crictl(&["pull", &image])
        .context("pull busybox")?;
    containerd.crictl(&["pull", &pause]).context("pull pause")?;
    let kubeconfig = cp.node_kubeconfig(name)?;
    let mut kubelet = match (kind, &cgroup_root) {
        (Kind::Upstream, Some(cg)) => Kubelet::Upstream(UpstreamKubelet::start(
            &ns,
            &upstream_kubelet::Options {
                node_name: name,
                kubeconfig: &kubeconfig,
                runtime_endpoint: &containerd.endpoint(),
                cgroup_root: cg,
                extra_config: "",
            },
        )?),
        _ => Kubelet::Strake(StrakeKubelet::start(&ns, name, &kubeconfig, &containerd)?),
    };
    let result = async {
        wait_node_ready(client, name, &mut kubelet).await?;
        tokio::time::sleep(SETTLE).await;
        let mut f = Figures {
            idle_rss_kib: status_kib(kubelet.pid(), "VmRSS:"),
            ..Figures::default()
        };
        let max = settings.counts.iter().copied().max().unwrap_or(0);
        for &n in &settings.counts {
            let run = format!("{}-{n}", name.trim_start_matches("bench-"));
            eprintln!("  {name}: starting {n} pods");
            let lat = start_pods(
                client,
                &mut kubelet,
                name,
                &run,
                n,
                settings.concurrency,
                &image,
            )
            .await?;
            eprintln!(
                "  {name}: {n} pods Running, p50 {:?} p99 {:?}",
                percentile(&lat, 50.0),
                percentile(&lat, 99.0)
            );
            f.startup.push((n, lat));
            if n == max {
                tokio::time::sleep(SETTLE).await;
                eprintln!("  {name}: steady state for {} s", settings.steady_secs);
                f.steady = steady_state(&mut kubelet, settings.steady_secs).await?;
                f.hwm_kib = status_kib(kubelet.pid(), "VmHWM:");
            }
            delete_pods(client, &run).await?;
        }
        anyhow::Ok(f)
    }
    .await;
    let log = match &kubelet {
        Kubelet::Upstream(k) => k.log_path(),
        Kubelet::Strake(k) => k.dir.path().join("kubelet.log"),
    };
    if let Some(dir) = &settings.logs {
        let copy = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::copy(&log, dir.join(format!("{name}.log"))));
        if let Err(e) = copy {
            eprintln!("  cannot copy {} to {}: {e}", log.display(), dir.display());
        }
    }
    if result.is_err() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!("{name} log (last lines):");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    drop(kubelet);
    drop(containerd);
    drop(ns);
    drop(cgroup_root);
    result
}

fn parse(args: &[String]) -> anyhow::Result<(Settings, Vec<Kind>)> {
    let mut s = Settings {
        counts: vec![30, 100],
        runs: 3,
        logs: None,
        steady_secs: 60,
        concurrency: 10,
    };
    let mut kinds = vec![Kind::Upstream, Kind::Strake];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--pods" => {
                s.counts = value()?
                    .split(',')
                    .map(|v| v.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--pods takes counts like 30,100")?;
            }
            "--steady-secs" => s.steady_secs = value()?.parse().context("--steady-secs")?,
            "--concurrency" => s.concurrency = value()?.parse().context("--concurrency")?,
            "--runs" => s.runs = value()?.parse().context("--runs")?,
            "--logs" => s.logs = Some(value()?.into()),
            "--only" => {
                kinds = match value()?.as_str() {
                    "kubelet" => vec![Kind::Upstream],
                    "strake-kubelet" => vec![Kind::Strake],
                    other => bail!("--only takes kubelet or strake-kubelet, not {other:?}"),
                }
            }
            other => bail!("unknown option {other:?}"),
        }
    }
    if s.counts.is_empty() || s.counts.contains(&0) {
        bail!("--pods needs counts above zero");
    }
    if s.runs == 0 || s.runs > 50 {
        bail!("--runs takes 1 to 50");
    }
    Ok((s, kinds))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `strake-bench kubelet [--pods 30,100] [--steady-secs 60] [--concurrency 10] [--logs DIR]
/// [--only kubelet|strake-kubelet]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let (settings, kinds) = parse(args)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let cp = ControlPlane::start(Options::default()).await?;
        let registry = Registry::start(cp.net(), &cp.dir().join("registry"))?;
        let client = cp.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE }
                }))?,
            )
            .await
            .context("create namespace")?;
        // The controller-manager creates the namespace's default ServiceAccount shortly after.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
        let deadline = Instant::now() + Duration::from_secs(60);
        while accounts.get_opt("default").await.ok().flatten().is_none() {
            if Instant::now() > deadline {
                bail!("no default ServiceAccount in {NAMESPACE} after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        let mut results: Vec<(Kind, Figures)> = Vec::new();
        let nodes: Api<Node> = Api::all(client.clone());
        let mut index = 0u8;
        for run in 0..settings.runs {
            // Alternate who goes first, so that neither always meets the warmer machine.
            let mut order = kinds.clone();
            if run % 2 == 1 {
                order.reverse();
            }
            for kind in order {
                eprintln!(
                    "run {}/{}: measuring {} ...",
                    run + 1,
                    settings.runs,
                    kind.node_name()
                );
                let f = measure(
                    kind,
                    index,
                    &cp,
                    &client,
                    &registry.open_in_cluster().to_string(),
                    &settings,
                )
                .await?;
                // Each measurement has a fresh node namespace (a deleted one's veth vanishes
                // asynchronously), and its Node object goes, so the next one's readiness is
                // its own.
                index = index.wrapping_add(1);
                let _ = nodes
                    .delete(kind.node_name(), &DeleteParams::default())
                    .await;
                results.push((kind, f));
            }
        }
        print_table(&results, &settings);
        anyhow::Ok(())
    })
}

/// min / median / max of `values` (the lower median for an even count).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => (0.0, 0.0, 0.0),
        n => (values[0], values[(n - 1) / 2], values[n - 1]),
    }
}

fn print_table(results: &[(Kind, Figures)], settings: &Settings) {
    let of = |k: Kind| -> Vec<&Figures> {
        results
            .iter()
            .filter(|(kind, _)| *kind == k)
            .map(|(_, f)| f)
            .collect()
    };
    let (u, s) = (of(Kind::Upstream), of(Kind::Strake));
    let version = strake_integration::paths::Versions::pinned().kubernetes;
    let max = settings.counts.iter().copied().max().unwrap_or(0);
    println!(
        "{} runs of each kubelet, alternating which goes first; min / median / max, and the ratio of the medians.\n",
        settings.runs
    );
    println!("| measure | kubelet {version} | strake-kubelet | strake / kubelet (medians) |");
    println!("| --- | --- | --- | --- |");
    let row = |what: String, get: &dyn Fn(&Figures) -> f64, show: &dyn Fn(f64) -> String| {
        let (a, b) = (
            spread(u.iter().map(|f| get(f)).collect()),
            spread(s.iter().map(|f| get(f)).collect()),
        );
        let cell = |(lo, mid, hi): (f64, f64, f64)| {
            if settings.runs == 1 {
                show(mid)
            } else {
                format!("{} / {} / {}", show(lo), show(mid), show(hi))
            }
        };
        println!(
            "| {what} | {} | {} | {} |",
            cell(a),
            cell(b),
            ratio(b.1, a.1)
        );
    };
    let millis = |v: f64| ms(Duration::from_secs_f64(v / 1000.0));
    let mebi = |v: f64| mib(v as u64);
    for &n in &settings.counts {
        for p in [50.0, 99.0] {
            let lat = move |f: &Figures| {
                f.startup
                    .iter()
                    .find(|(c, _)| *c == n)
                    .map(|(_, l)| percentile(l, p))
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0
            };
            row(
                format!("pod startup p{p:.0}, {n} pods at once"),
                &lat,
                &millis,
            );
        }
    }
    row(
        "RSS, node Ready, no pods".into(),
        &|f| f.idle_rss_kib as f64,
        &mebi,
    );
    row(
        format!("RSS with {max} pods (mean over {} s)", settings.steady_secs),
        &|f| f.steady.rss_mean_kib as f64,
        &mebi,
    );
    row(
        "peak RSS (VmHWM) over the run".into(),
        &|f| f.hwm_kib as f64,
        &mebi,
    );
    row(
        format!(
            "CPU with {max} pods (% of one core over {} s)",
            settings.steady_secs
        ),
        &|f| f.steady.cpu_percent,
        &|v| format!("{v:.1} %"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        let v: Vec<Duration> = (1..=30).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(30));
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(15));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn options_parse() -> anyhow::Result<()> {
        let args: Vec<String> = ["--pods", "5,7", "--steady-secs", "3", "--only", "kubelet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (s, kinds) = parse(&args)?;
        assert_eq!(s.counts, vec![5, 7]);
        assert_eq!(s.steady_secs, 3);
        assert_eq!(kinds, vec![Kind::Upstream]);
        assert_eq!(s.runs, 3);
        assert!(parse(&["--pods".to_string(), "0".to_string()]).is_err());
        assert!(parse(&["--runs".to_string(), "0".to_string()]).is_err());
        Ok(())
    }

    #[test]
    fn spreads_are_min_lower_median_max() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0, 3.0, 2.0]), (1.0, 2.0, 4.0));
        assert_eq!(spread(vec![]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn cpu_ticks_of_self_are_read() {
        // Burn a little CPU so the counter is above zero.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i ^ (x >> 3)));
        }
        assert!(cpu_ticks(std::process::id()) > 0);
        assert!(status_kib(std::process::id(), "VmRSS:") > 0);
    }
}
