//! `strake-bench runtime [--pods N]`: strake-runtime versus containerd (same runc, same CNI
//! plugins, same local registry, each in its own test-bed node namespace):
//! - pull of `strake/multilayer:1` (cold, then the image removed again), 3 times;
//! - RunPodSandbox + CreateContainer + StartContainer of one pod (`crictl run`), 5 times;
//! - the same for N pods started concurrently (default 20);
//! - resident memory per running pod of the runtime's per-pod processes (strake: monitor +
//!   pause; containerd: shim + the sandbox image's `sh` and `sleep`), and of the daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strake_integration::containerd::Containerd;
use strake_integration::netns::{ClusterNet, NodeNs};
use strake_integration::registry::Registry;
use strake_integration::strake_runtime::StrakeRuntime;

enum Rt {
    Containerd(Containerd),
    Strake(StrakeRuntime),
}

impl Rt {
    fn crictl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(match self {
            Rt::Containerd(c) => c.crictl(args)?,
            Rt::Strake(s) => s.crictl(args)?,
        })
    }
    fn cgroup_parent(&self) -> &str {
        match self {
            Rt::Containerd(c) => c.cgroup_parent(),
            Rt::Strake(s) => s.cgroup_parent(),
        }
    }
    fn daemon_pid(&self) -> u32 {
        match self {
            Rt::Containerd(c) => c.pid(),
            Rt::Strake(s) => s.pid(),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Proportional set size: shared pages (binary text, libc) divided among their users, which is
/// what each additional pod really costs.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn ppid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok())
        })
}

/// RSS of this run's per-pod processes named in `names`: a process counts when it lives in the
/// node's network namespace (shims, monitors), below the run's cgroup parent (sandbox and
/// workload containers), or is a direct child of the runtime daemon (strake's pause).
fn per_pod_rss(
    names: &[&str],
    pods: u32,
    node_netns: u64,
    cgroup_parent: &str,
    daemon: u32,
) -> (u64, u64, BTreeMap<String, u64>) {
    use std::os::unix::fs::MetadataExt;
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut pss = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0, by_name);
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let c = comm(p);
        if !names.iter().any(|n| c.starts_with(n)) {
            continue;
        }
        let in_node =
            std::fs::metadata(format!("/proc/{p}/ns/net")).is_ok_and(|m| m.ino() == node_netns);
        let in_cgroup = std::fs::read_to_string(format!("/proc/{p}/cgroup"))
            .is_ok_and(|s| s.contains(cgroup_parent));
        if in_node || in_cgroup || ppid(p) == Some(daemon) {
            *by_name.entry(c).or_default() += rss_kib(p);
            pss += pss_kib(p);
        }
    }
    let total: u64 = by_name.values().sum();
    let n = u64::from(pods.max(1));
    (total / n, pss / n, by_name)
}

fn write_configs(
    dir: &Path,
    registry: &Registry,
    cgroup_parent: &str,
    i: u32,
) -> anyhow::Result<(String, String)> {
    let pod = serde_json::json!({
        "metadata": { "name": format!("bench-{i}"), "namespace": "bench", "uid": format!("uid-bench-{i}"), "attempt": 0 },
        "hostname": format!("bench-{i}"),
        "log_directory": dir.join("logs").join(i.to_string()),
        "linux": { "cgroup_parent": cgroup_parent }
    });
    let ctr = serde_json::json!({
        "metadata": { "name": "app" },
        "image": { "image": format!("{}/strake/busybox:1", registry.open_in_cluster()) },
        // Named unlike any runtime process, so it is never counted as overhead.
        "command": ["/bin/tail", "-f", "/dev/null"],
        "log_path": "app.log",
        "linux": {}
    });
    let p = dir.join(format!("pod-{i}.json"));
    let c = dir.join(format!("ctr-{i}.json"));
    std::fs::write(&p, pod.to_string())?;
    std::fs::write(&c, ctr.to_string())?;
    Ok((c.display().to_string(), p.display().to_string()))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Figures {
    pull: Duration,
    start_one: Duration,
    start_n: Duration,
    per_pod_kib: u64,
    per_pod_pss_kib: u64,
    breakdown: BTreeMap<String, u64>,
    daemon_kib: u64,
}

async fn measure(
    kind: &str,
    node: &mut NodeNs,
    index: u8,
    registry: &Registry,
    pods: u32,
) -> anyhow::Result<Figures> {
    let rt = match kind {
        "containerd" => Rt::Containerd(Containerd::start(node, index).await?),
        _ => Rt::Strake(StrakeRuntime::start(node, index).await?),
    };
    let dir = tempfile::tempdir()?;
    let busybox = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let multilayer = format!("{}/strake/multilayer:1", registry.open_in_cluster());
    rt.crictl(&["pull", &busybox]).context("pull busybox")?;

    let mut pulls = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        rt.crictl(&["pull", &multilayer])
            .context("pull multilayer")?;
        pulls.push(t.elapsed());
        rt.crictl(&["rmi", &multilayer]).context("rmi multilayer")?;
    }

    let mut ones = Vec::new();
    for i in 0..5 {
        let (c, p) = write_configs(dir.path(), registry, rt.cgroup_parent(), 1000 + i)?;
        let t = Instant::now();
        rt.crictl(&["run", &c, &p]).context("crictl run")?;
        ones.push(t.elapsed());
    }
    rt.crictl(&["rmp", "--force", "--all"])
        .context("remove pods")?;

    let configs: Vec<(String, String)> = (0..pods)
        .map(|i| write_configs(dir.path(), registry, rt.cgroup_parent(), i))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let handles: Vec<_> = configs
        .into_iter()
        .map(|(c, p)| {
            let endpoint = match &rt {
                Rt::Containerd(x) => x.endpoint(),
                Rt::Strake(x) => x.endpoint(),
            };
            std::thread::spawn(move || {
                let crictl = strake_integration::paths::cri_tools_bin("crictl")?;
                strake_integration::process::run(
                    std::process::Command::new(crictl)
                        .args([
                            "--runtime-endpoint",
                            &endpoint,
                            "--image-endpoint",
                            &endpoint,
                            "--timeout",
                            "120s",
                            "run",
                        ])
                        .args([&c, &p]),
                )
            })
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(r) => {
                r?;
            }
            Err(_) => bail!("a crictl thread panicked"),
        }
    }
    let start_n = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names: &[&str] = match kind {
        // containerd's sandbox is the pause image: `sh` waiting on a `sleep`.
        "containerd" => &["containerd-shim", "sh", "sleep"],
        _ => &["strake-monitor", "strake-pause"],
    };
    let (per_pod_kib, per_pod_pss_kib, breakdown) = per_pod_rss(
        names,
        pods,
        node.ns().inode()?,
        rt.cgroup_parent(),
        rt.daemon_pid(),
    );
    let daemon_kib = rss_kib(rt.daemon_pid());
    rt.crictl(&["rmp", "--force", "--all"])
        .context("remove pods")?;
    Ok(Figures {
        pull: median(pulls),
        start_one: median(ones),
        start_n,
        per_pod_kib,
        per_pod_pss_kib,
        breakdown,
        daemon_kib,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// `strake-bench runtime [--pods N]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let pods: u32 = args
        .iter()
        .position(|a| a == "--pods")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let net = ClusterNet::create()?;
        let dir = tempfile::tempdir()?;
        let registry = Registry::start(&net, dir.path())?;
        let mut results = Vec::new();
        for (index, kind) in ["containerd", "strake-runtime"].into_iter().enumerate() {
            eprintln!("measuring {kind} ...");
            // A fresh node each: a deleted namespace's veth disappears asynchronously.
            let mut node = net.add_node(index as u8)?;
            let f = measure(kind, &mut node, index as u8, &registry, pods).await?;
            drop(node);
            results.push((kind, f));
        }
        let (c, s) = (&results[0].1, &results[1].1);
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        println!("| measure | containerd 1.6 | strake-runtime | strake / containerd |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| pull strake/multilayer:1 (median of 3) | {} | {} | {} |",
            ms(c.pull),
            ms(s.pull),
            ratio(s.pull.as_secs_f64(), c.pull.as_secs_f64())
        );
        println!(
            "| run 1 pod: sandbox + create + start (median of 5) | {} | {} | {} |",
            ms(c.start_one),
            ms(s.start_one),
            ratio(s.start_one.as_secs_f64(), c.start_one.as_secs_f64())
        );
        println!(
            "| run {pods} pods concurrently | {} | {} | {} |",
            ms(c.start_n),
            ms(s.start_n),
            ratio(s.start_n.as_secs_f64(), c.start_n.as_secs_f64())
        );
        println!(
            "| RSS per running pod (runtime's per-pod processes) | {} KiB | {} KiB | {} |",
            c.per_pod_kib,
            s.per_pod_kib,
            ratio(s.per_pod_kib as f64, c.per_pod_kib as f64)
        );
        println!(
            "| PSS per running pod (shared pages divided among users) | {} KiB | {} KiB | {} |",
            c.per_pod_pss_kib,
            s.per_pod_pss_kib,
            ratio(s.per_pod_pss_kib as f64, c.per_pod_pss_kib as f64)
        );
        println!(
            "| daemon RSS with {pods} pods | {} KiB | {} KiB | {} |",
            c.daemon_kib,
            s.daemon_kib,
            ratio(s.daemon_kib as f64, c.daemon_kib as f64)
        );
        println!();
        println!(
            "per-process RSS totals (KiB): containerd {:?}; strake-runtime {:?}",
            c.breakdown, s.breakdown
        );
        anyhow::Ok(())
    })
}
