//! `strake-bench proxy [--services 1000,10000,30000] [--endpoints 2,10] [--timeout 600]
//! [--probes 101] [--proxies kube-proxy,strake-proxy]`: strake-proxy versus upstream kube-proxy
//! in nftables mode (issue #4), one after the other against the same API server and the same
//! objects, each in a fresh test-bed node namespace of its own.
//!
//! The objects: Services without selectors (`bench/s-<i>`, one TCP port 80 -> 8080, ClusterIPs
//! assigned from 10.96.16.1 upwards) and one EndpointSlice each (`s-<i>-1`, IPv4, M ready
//! endpoints on another node), created straight through the API (64 requests in flight, with
//! the admin client, which API priority and fairness exempts). Sizes run N ascending, then M:
//! objects are only added (N grows) or their slices patched to M endpoints, never deleted.
//! Plus a probe Service `bench/probe` (10.96.250.250:80 -> 10.250.0.1:8080) for the
//! first-packet latency, and the `kubernetes` Service.
//!
//! Per size and proxy: a fresh node namespace, a Node object for it, and the proxy started
//! with upstream's defaults (`--min-sync-period` 1 s, `--sync-period` 30 s), the same flags
//! where both have them (`--cluster-cidr`, metrics on 127.0.0.1:10249 and health on
//! 127.0.0.1:10256 inside the node namespace), and the identity `system:kube-proxy`, which
//! upstream binds to `system:node-proxier` by default. Measured:
//! - full sync: from process start (all objects already exist) to the end of the first
//!   successful sync, as the proxy itself reports it
//!   (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`, per IP family for kube-proxy: the
//!   later one), read from a thread that entered the node namespace, minus the wall-clock time
//!   just before the spawn. Both proxies sync only once their informers have listed
//!   everything, so that first sync covers every object; the element count of the
//!   `service-ips` map (`nft -j list map`) confirms it. A proxy that has not synced within
//!   `--timeout` is reported as "> T s" and skipped at larger sizes.
//! - one added Service: its EndpointSlice goes in first and the proxy is let idle (no sync for
//!   1.5 s); then the Service is created. Timed from before that API call to the kernel's
//!   nftables notification adding its `service-ips` element (a netlink socket subscribed to
//!   `NFNLGRP_NFTABLES` in the node namespace), then confirmed with `nft get element`. How
//!   long the create call itself took is reported beside it: the API server's share, the
//!   same whichever proxy runs.
//! - one endpoint change: patch `s-0-1`, replacing one endpoint's address; timed to the first
//!   notification carrying the new address, confirmed with `nft` in the Service's dispatch
//!   chain (kube-proxy: the `goto` target of its `service-ips` element) or its elements of the
//!   `endpoints` map (strake-proxy).
//! - first-packet latency: median TCP connect time of `--probes` new connections from the node
//!   namespace to the probe ClusterIP, DNATed to a listener on 10.250.0.1 (on the node
//!   namespace's loopback): each connection is new to conntrack, so its SYN goes through the
//!   nat chains and the `service-ips` lookup.
//! - peak RSS: the proxy's VmHWM at the end, and the largest VmHWM seen of its child processes
//!   (`nft`, which both run for transactions), sampled every 50 ms while it runs.
//!
//! The machine is shared: figures are from one run each.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use strake_integration::control_plane::{ControlPlane, Options, POD_CIDR};
use strake_integration::kube_proxy;
use strake_integration::netns::NodeNs;
use strake_integration::paths;

const NAMESPACE: &str = "bench";
/// API requests in flight while creating objects.
const CONCURRENCY: usize = 64;
/// First ClusterIP of the bulk Services (`s-<i>` gets this + i).
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 16, 1);
/// Endpoint `j` of Service `i` is this + 16 i + j + 1 (at most 16 endpoints).
const FIRST_ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const MAX_ENDPOINTS: usize = 16;
const MAX_SERVICES: usize = 40_000;
const PROBE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 250);
const PROBE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const PROBE_PORT: u16 = 8080;
/// How long to wait for one change to be programmed before giving up on it.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// The proxy is idle when it has not synced for this long.
const QUIET: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KubeProxy,
    Strake,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::KubeProxy => "kube-proxy",
            Kind::Strake => "strake-proxy",
        }
    }

    /// The proxy's IPv4 table (in its node namespace): both name it after themselves.
    fn table(self) -> &'static str {
        self.name()
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "kube-proxy" => Ok(Kind::KubeProxy),
            "strake-proxy" => Ok(Kind::Strake),
            other => bail!("unknown proxy {other:?} (kube-proxy, strake-proxy)"),
        }
    }
}

struct Opts {
    services: Vec<usize>,
    endpoints: Vec<usize>,
    timeout: Duration,
    probes: usize,
    proxies: Vec<Kind>,
}

fn parse_opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        services: vec![1000, 10_000, 30_000],
        endpoints: vec![2, 10],
        timeout: Duration::from_secs(600),
        probes: 101,
        proxies: vec![Kind::KubeProxy, Kind::Strake],
    };
    let list = |v: &str| -> anyhow::Result<Vec<usize>> {
        v.split(',')
            .map(|x| x.trim().parse::<usize>().with_context(|| format!("{x:?}")))
            .collect()
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--services" => o.services = list(value)?,
            "--endpoints" => o.endpoints = list(value)?,
            "--timeout" => o.timeout = Duration::from_secs(value.parse()?),
            "--probes" => o.probes = value.parse()?,
            "--proxies" => {
                o.proxies = value
                    .split(',')
                    .map(|s| Kind::parse(s.trim()))
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown option {other:?}"),
        }
    }
    o.services.sort_unstable();
    o.services.dedup();
    o.endpoints.sort_unstable();
    o.endpoints.dedup();
    if o.services.is_empty() || o.endpoints.is_empty() || o.proxies.is_empty() {
        bail!("--services, --endpoints and --proxies need at least one value each");
    }
    if o.endpoints.iter().any(|m| *m == 0 || *m > MAX_ENDPOINTS) {
        bail!("--endpoints must be within 1..={MAX_ENDPOINTS}");
    }
    if o.services.iter().any(|n| *n == 0 || *n > MAX_SERVICES) {
        bail!("--services must be within 1..={MAX_SERVICES} (the bench's ClusterIP range)");
    }
    Ok(o)
}

fn nth_ip(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

fn service_ip(i: usize) -> Ipv4Addr {
    nth_ip(FIRST_CLUSTER_IP, i)
}

fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    nth_ip(FIRST_ENDPOINT_IP, i * MAX_ENDPOINTS + j + 1)
}

fn bulk_endpoints(i: usize, m: usize) -> Vec<Ipv4Addr> {
    (0..m).map(|j| endpoint_ip(i, j)).collect()
}

fn service(name: &str, ip: Ipv4Addr, target_port: u16) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": {
            "clusterIP": ip.to_string(),
            "ports": [{ "name": "http", "port": 80, "targetPort": target_port, "protocol": "TCP" }],
        },
    }))?)
}

fn endpoints_json(ips: &[Ipv4Addr]) -> serde_json::Value {
    ips.iter()
        .map(|ip| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": "elsewhere",
            })
        })
        .collect()
}

fn slice(service: &str, ips: &[Ipv4Addr], port: u16) -> anyhow::Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("{service}-1"),
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "strake-bench",
            },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }],
        "endpoints": endpoints_json(ips),
    }))?)
}

/// Retries `f` on errors the API server gives under load (timeouts, 429, 5xx); a create that
/// finds the object already there (a retried request that had gone through) counts as done.
async fn retry<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                return Ok(());
            }
            Err(e) => {
                let transient = match &e {
                    kube::Error::Api(s) => s.code == 429 || s.code >= 500,
                    _ => true,
                };
                if !transient || attempt >= 8 {
                    return Err(e).context(what.to_string());
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs `f(i)` for every `i` in `0..count`, [`CONCURRENCY`] at a time, printing progress.
async fn parallel<F, Fut>(what: &str, count: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    if count == 0 {
        return Ok(());
    }
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY.min(count) {
        let (next, done, f) = (next.clone(), done.clone(), f.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                f(i).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => bail!("a worker failed: {e}"),
            },
            _ = tick.tick() => {
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {what}: {n}/{count} ({:.0}/s)",
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    eprintln!(
        "  {what}: {count} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The bulk objects as they are in the API server: `service_count` Services, and slices of
/// which slice `i` has `slice_endpoints[i]` endpoints.
struct Objects {
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    service_count: usize,
    slice_endpoints: Vec<usize>,
}

impl Objects {
    /// Adds Services up to `n` and brings every slice below `n` to `m` endpoints.
    async fn ensure(&mut self, n: usize, m: usize) -> anyhow::Result<()> {
        let from = self.service_count;
        if n > from {
            let api = self.services.clone();
            parallel("create Services", n - from, move |k| {
                let api = api.clone();
                async move {
                    let i = from + k;
                    let svc = &service(&format!("s-{i}"), service_ip(i), 8080)?;
                    let api = &api;
                    retry("create Service", || async move {
                        api.create(&PostParams::default(), svc).await.map(|_| ())
                    })
                    .await
                }
            })
            .await?;
            self.service_count = n;
        }
        let stale: Arc<Vec<usize>> = Arc::new(
            (0..self.slice_endpoints.len().min(n))
                .filter(|i| self.slice_endpoints[*i] != m)
                .collect(),
        );
        let api = self.slices.clone();
        let list = stale.clone();
        parallel("patch EndpointSlices", stale.len(), move |k| {
            let (api, list) = (api.clone(), list.clone());
            async move {
                let i = list[k];
                let patch =
                    &Patch::Merge(json!({ "endpoints": endpoints_json(&bulk_endpoints(i, m)) }));
                let api = &api;
                retry("patch EndpointSlice", || async move {
                    api.patch(&format!("s-{i}-1"), &PatchParams::default(), patch)
                        .await
                        .map(|_| ())
                })
                .await
            }
        })
        .await?;
        for i in stale.iter() {
            self.slice_endpoints[*i] = m;
        }
        let from = self.slice_endpoints.len();
        if n > from {
            let api = self.slices.clone();
            parallel("create EndpointSlices", n - from, move |k| {
                let api = api.clone();
                async move {
                    let i = from + k;
                    let s = &slice(&format!("s-{i}"), &bulk_endpoints(i, m), 8080)?;
                    let api = &api;
                    retry("create EndpointSlice", || async move {
                        api.create(&PostParams::default(), s).await.map(|_| ())
                    })
                    .await
                }
            })
            .await?;
            self.slice_endpoints.resize(n, m);
        }
        Ok(())
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside a network namespace (`setns` changes only the calling thread), running the
/// closures sent to it; sockets it opens and programs it starts belong to that namespace. Much
/// cheaper per call than a fresh `nsenter`.
struct NsThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsThread {
    fn enter(netns: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(netns).with_context(|| format!("open {netns:?}"))?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns(2) on an open namespace file; it affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let entered = if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        ready_rx
            .recv()
            .context("namespace thread")?
            .context("setns")?;
        Ok(NsThread {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .context("namespace thread stopped")?
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("namespace thread gone"))?;
        rx.recv().context("namespace thread dropped a job")
    }

    /// Runs `nft args...` in the namespace: its stdout, or its stderr as the error.
    fn nft(&self, args: &[&str]) -> anyhow::Result<Result<String, String>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run(move || {
            match std::process::Command::new("nft")
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
            {
                Ok(out) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                }
                Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const LAST_SYNC_METRIC: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";

/// The time of the last sync from a `/metrics` body: `kubeproxy_sync_proxy_rules_last_timestamp_seconds`,
/// which kube-proxy labels per IP family (one proxier each); the latest of them, once every
/// family has synced (`None` before).
fn parse_last_sync(body: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter(|l| {
            l.strip_prefix(LAST_SYNC_METRIC)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .collect();
    if values.is_empty() || values.iter().any(|v| *v <= 0.0) {
        return None;
    }
    values.into_iter().reduce(f64::max)
}

/// The time of the last sync the proxy in `ns` reports; `None` while its metrics server does
/// not answer or before its first sync.
fn last_sync(ns: &NsThread) -> anyhow::Result<Option<f64>> {
    ns.run(|| {
        let addr: SocketAddr = kube_proxy::METRICS_ADDRESS.parse().ok()?;
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        parse_last_sync(&body)
    })
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// A running proxy under measurement.
struct Running {
    kind: Kind,
    pid: u32,
    log: PathBuf,
    child_peak_kib: u64,
}

impl Running {
    fn sample(&mut self) {
        for c in children(self.pid) {
            self.child_peak_kib = self.child_peak_kib.max(status_kib(c, "VmHWM:"));
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        if strake_integration::process::pid_alive(self.pid) {
            return Ok(());
        }
        bail!(
            "{} exited; last log lines:\n{}",
            self.kind.name(),
            self.log_tail(30)
        )
    }

    /// Waits until no sync has finished for [`QUIET`] (or until `max` passed).
    fn settle(&mut self, ns: &NsThread, max: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + max;
        let mut last = last_sync(ns)?;
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            self.sample();
            let now = last_sync(ns)?;
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= QUIET {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// What one proxy measured at one size.
#[derive(Default)]
struct Figures {
    /// `Err` holds why there is no figure ("> 600 s").
    full_sync: Option<Result<Duration, String>>,
    elements: usize,
    add_service: Option<Duration>,
    /// How long the API server took to answer the create of that Service (a part of
    /// `add_service` the proxy has no say in).
    add_service_api: Option<Duration>,
    endpoint_change: Option<Duration>,
    first_packet: Option<Duration>,
    rss_kib: u64,
    child_peak_kib: u64,
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Number of elements of map `service-ips` in the proxy's table.
fn service_ips_elements(ns: &NsThread, kind: Kind) -> anyhow::Result<usize> {
    let text = ns
        .nft(&["-j", "list", "map", "ip", kind.table(), "service-ips"])?
        .map_err(|e| anyhow!("nft list map: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("nft -j output")?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("map"))
        .map(|m| m["elem"].as_array().map_or(0, Vec::len))
        .sum())
}

/// `nft get element ip <table> service-ips { <ip> . tcp . 80 }`.
fn get_element(ns: &NsThread, kind: Kind, ip: Ipv4Addr) -> anyhow::Result<Result<String, String>> {
    let ip = ip.to_string();
    ns.nft(&[
        "get",
        "element",
        "ip",
        kind.table(),
        "service-ips",
        "{",
        &ip,
        ".",
        "tcp",
        ".",
        "80",
        "}",
    ])
}

/// The nftables netlink multicast group (`NFNLGRP_NFTABLES`): every committed change.
const NFNLGRP_NFTABLES: libc::c_int = 7;

/// The kernel's nftables change notifications in the node namespace, each datagram stamped
/// when read. Watching them costs the proxy nothing, unlike polling `nft`, whose every call
/// reads the proxy's whole table back (hundreds of ms at 1k Services), and unlike
/// `nft monitor`, which reads it all when it starts (over a minute at 10k). The messages are
/// not decoded: a change is recognised by bytes it must carry (an address in network order,
/// or its text in a chain name).
///
/// Hand-written (socket, bind, two setsockopt calls, recv): the netlink crates in the
/// workspace speak rtnetlink, not nftables, and nothing here needs decoding.
struct Watch {
    stop: Arc<AtomicBool>,
    messages: mpsc::Receiver<(Instant, Vec<u8>)>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Open while the reader uses its raw descriptor; closed after the reader is joined.
    _fd: std::os::fd::OwnedFd,
}

fn setsockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to a live value and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Watch {
    /// Subscribes in the namespace of `ns` (a socket belongs to the namespace it is made in).
    fn start(ns: &NsThread) -> anyhow::Result<Self> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        let fd: OwnedFd = ns.run(|| -> std::io::Result<OwnedFd> {
            // SAFETY: plain socket(2); the result is checked before it is owned.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_NETFILTER,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a new descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })??;
        let raw = fd.as_raw_fd();
        // Multicast is delivered to bound sockets only; port 0 lets the kernel pick one.
        // SAFETY: an all-zero sockaddr_nl is valid (family set below).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind(2) with a pointer to a live sockaddr_nl and its size.
        let rc = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind netlink socket");
        }
        // Room for a sync's burst; losing some of it (ENOBUFS) is harmless here.
        let _ = setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(64 << 20));
        setsockopt(
            raw,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            &NFNLGRP_NFTABLES,
        )
        .context("subscribe to nftables notifications")?;
        // The reader wakes up this often to see whether it should stop.
        let tick = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tick)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, messages) = mpsc::channel();
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: recv(2) into a buffer we own, of its length; the descriptor is
                // closed only after this thread is joined.
                let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    let at = Instant::now();
                    if tx.send((at, buf[..n as usize].to_vec())).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch {
            stop,
            messages,
            reader: Some(reader),
            _fd: fd,
        })
    }

    /// Forgets what was reported so far.
    fn drain(&self) {
        while self.messages.try_recv().is_ok() {}
    }

    /// The time from `since` to the first notification that `found` accepts.
    fn wait_for(
        &self,
        since: Instant,
        timeout: Duration,
        found: impl Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Duration> {
        let deadline = since + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok((at, msg)) if found(&msg) => return Ok(at.saturating_duration_since(since)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no such nftables notification within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("netlink reader stopped"),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a notification carries address `ip`: in network byte order (a map key or a DNAT
/// target) or as text (in the name of an endpoint chain).
fn carries_ip(msg: &[u8], ip: Ipv4Addr) -> bool {
    contains(msg, &ip.octets()) || contains(msg, ip.to_string().as_bytes())
}

/// Whether nft's listing of a chain names endpoint address `ip`: in an endpoint chain's name
/// (`...__<ip>/<port>`), a DNAT target (`<ip>:<port>`) or a DNAT map (`<ip> . <port>`).
fn names_ip(text: &str, ip: &str) -> bool {
    [" ", "/", ":", ","]
        .iter()
        .any(|end| text.contains(&format!("{ip}{end}")))
}

/// Median TCP connect time to the probe ClusterIP over `probes` new connections.
fn first_packet(ns: &NsThread, probes: usize) -> anyhow::Result<Duration> {
    ns.run(move || -> anyhow::Result<Duration> {
        let listener = TcpListener::bind((PROBE_BACKEND, PROBE_PORT))?;
        let target = SocketAddr::from((PROBE_CLUSTER_IP, 80));
        let mut times = Vec::with_capacity(probes);
        for _ in 0..probes {
            let t = Instant::now();
            let conn = TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .context("connect to the probe ClusterIP")?;
            times.push(t.elapsed());
            drop(conn);
            let _ = listener.accept()?;
        }
        times.sort();
        Ok(times[times.len() / 2])
    })?
}

struct Bench<'a> {
    cp: &'a ControlPlane,
    client: kube::Client,
    kubeconfig: PathBuf,
    logs: PathBuf,
    counter: u8,
    probes: usize,
}

impl Bench<'_> {
    /// Starts `kind` in a fresh node and measures everything at the current size.
    async fn measure(
        &mut self,
        kind: Kind,
        n: usize,
        m: usize,
        timeout: Duration,
    ) -> anyhow::Result<Figures> {
        let index = self.counter;
        self.counter = self
            .counter
            .checked_add(1)
            .filter(|c| *c <= 200)
            .context("more than 200 proxy runs")?;
        let mut node: NodeNs = self.cp.net().add_node(index)?;
        node.ns()
            .ip(&["addr", "add", &format!("{PROBE_BACKEND}/32"), "dev", "lo"])?;
        let node_name = format!("bench-{}-{index}", kind.name());
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node_obj: Node = serde_json::from_value(json!({
            "metadata": { "name": node_name, "labels": { "kubernetes.io/hostname": node_name } },
            "status": { "addresses": [
                { "type": "InternalIP", "address": node.ip().to_string() },
                { "type": "Hostname", "address": node_name },
            ] },
        }))?;
        nodes.create(&PostParams::default(), &node_obj).await?;
        let result = self
            .measure_on(kind, &mut node, &node_name, n, m, timeout)
            .await;
        drop(node);
        let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
        result
    }

    async fn measure_on(
        &mut self,
        kind: Kind,
        node: &mut NodeNs,
        node_name: &str,
        n: usize,
        m: usize,
        timeout: Duration,
    ) -> anyhow::Result<Figures> {
        let log = self.logs.join(format!("{}-{n}x{m}.log", kind.name()));
        let ns = NsThread::enter(&node.ns().path())?;
        let wall0 = wall_now();
        let started = Instant::now();
        let pid = match kind {
            Kind::KubeProxy => kube_proxy::spawn(node, node_name, &self.kubeconfig, &log)?,
            Kind::Strake => {
                let bin = paths::workspace_bin("strake-proxy")?;
                let args = [
                    format!("--kubeconfig={}", self.kubeconfig.display()),
                    format!("--hostname-override={node_name}"),
                    format!("--cluster-cidr={POD_CIDR}"),
                    format!("--metrics-bind-address={}", kube_proxy::METRICS_ADDRESS),
                    format!("--healthz-bind-address={}", kube_proxy::HEALTHZ_ADDRESS),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                node.spawn("strake-proxy", &bin, &args, &log)?
            }
        };
        let mut proxy = Running {
            kind,
            pid,
            log,
            child_peak_kib: 0,
        };
        let mut f = Figures::default();
        let synced = loop {
            if let Some(ts) = last_sync(&ns)? {
                break Some(Duration::from_secs_f64((ts - wall0).max(0.0)));
            }
            proxy.check_alive()?;
            proxy.sample();
            if started.elapsed() > timeout {
                break None;
            }
            // Awaited, so that a signal can end the run while a proxy syncs for minutes.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let Some(full) = synced else {
            eprintln!(
                "  {}: no sync within {} s; last log lines:\n{}",
                kind.name(),
                timeout.as_secs(),
                proxy.log_tail(15)
            );
            f.full_sync = Some(Err(format!("> {} s", timeout.as_secs())));
            f.rss_kib = status_kib(pid, "VmHWM:");
            f.child_peak_kib = proxy.child_peak_kib;
            return Ok(f);
        };
        f.full_sync = Some(Ok(full));
        eprintln!(
            "  {}: full sync of {n} x {m} in {:.3} s",
            kind.name(),
            full.as_secs_f64()
        );
        f.elements = service_ips_elements(&ns, kind)?;
        if f.elements < n + 1 {
            bail!(
                "{}: service-ips has {} elements after the first sync, expected at least {}",
                kind.name(),
                f.elements,
                n + 1
            );
        }
        let watch = Watch::start(&ns)?;
        proxy.settle(&ns, Duration::from_secs(30))?;

        // One added Service. Its EndpointSlice goes in first, and the proxy is let idle again,
        // so that what is timed is one API change: with both in a row the second would wait
        // for the minimum sync period.
        let k = self.counter;
        let added = format!("added-{k}");
        let added_ip = Ipv4Addr::new(10, 96, 251, k);
        let services: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NAMESPACE);
        let eps: Vec<Ipv4Addr> = (0..m)
            .map(|j| Ipv4Addr::new(10, 126, k, j as u8 + 1))
            .collect();
        let svc = service(&added, added_ip, 8080)?;
        let sl = slice(&added, &eps, 8080)?;
        slices.create(&PostParams::default(), &sl).await?;
        proxy.settle(&ns, Duration::from_secs(30))?;
        watch.drain();
        let t = Instant::now();
        services.create(&PostParams::default(), &svc).await?;
        let api_call = t.elapsed();
        let took = watch
            .wait_for(t, CHANGE_TIMEOUT, |msg| {
                contains(msg, b"service-ips\0") && contains(msg, &added_ip.octets())
            })
            .with_context(|| format!("{}: the added Service", kind.name()))?;
        get_element(&ns, kind, added_ip)?
            .map_err(|e| anyhow!("{}: added Service notified but absent: {e}", kind.name()))?;
        f.add_service = Some(took);
        f.add_service_api = Some(api_call);
        eprintln!(
            "  {}: one added Service programmed in {:.1} ms (the API call answered after {:.1} ms)",
            kind.name(),
            took.as_secs_f64() * 1000.0,
            api_call.as_secs_f64() * 1000.0
        );
        proxy.settle(&ns, Duration::from_secs(30))?;

        // One endpoint change in s-0: find the chain its ClusterIP dispatches to.
        let element = get_element(&ns, kind, service_ip(0))?
            .map_err(|e| anyhow!("nft get element of s-0: {e}"))?;
        let chain = element
            .split_whitespace()
            .skip_while(|w| *w != "goto" && *w != "jump")
            .nth(1)
            .map(|c| c.trim_end_matches([',', '}']).to_string())
            .with_context(|| format!("no goto in {element:?}"))?;
        // kube-proxy names the endpoints in that chain; strake-proxy's shared chain looks
        // them up in its `endpoints` map, keyed by the ClusterIP and a slot.
        let frontend = format!("{} . tcp . 80 . ", service_ip(0));
        let list_chain = || match kind {
            Kind::KubeProxy => ns
                .nft(&["list", "chain", "ip", kind.table(), &chain])?
                .map_err(|e| anyhow!("nft list chain {chain}: {e}")),
            Kind::Strake => ns
                .nft(&["list", "map", "ip", kind.table(), "endpoints"])?
                .map_err(|e| anyhow!("nft list map endpoints: {e}"))
                .map(|listing| {
                    listing
                        .lines()
                        .filter(|l| l.contains(&frontend))
                        .collect::<Vec<_>>()
                        .join("\n")
                }),
        };
        let old_ip = endpoint_ip(0, m - 1).to_string();
        let before = list_chain()?;
        if !names_ip(&before, &old_ip) {
            bail!(
                "{}: chain {chain} does not name endpoint {old_ip}:\n{before}",
                kind.name()
            );
        }
        let mut ips = bulk_endpoints(0, m);
        let new_ip = Ipv4Addr::new(10, 127, k, 1);
        ips[m - 1] = new_ip;
        let patch = Patch::Merge(json!({ "endpoints": endpoints_json(&ips) }));
        watch.drain();
        let t = Instant::now();
        slices
            .patch("s-0-1", &PatchParams::default(), &patch)
            .await?;
        let took = watch
            .wait_for(t, CHANGE_TIMEOUT, |msg| carries_ip(msg, new_ip))
            .with_context(|| format!("{}: the endpoint change", kind.name()))?;
        let after = list_chain()?;
        if !names_ip(&after, &new_ip.to_string()) {
            bail!(
                "{}: endpoint change notified, but chain {chain} does not name {new_ip}:\n{after}",
                kind.name()
            );
        }
        f.endpoint_change = Some(took);
        eprintln!(
            "  {}: one endpoint change programmed in {:.1} ms",
            kind.name(),
            took.as_secs_f64() * 1000.0
        );
        drop(watch);
        // Put s-0 back for the next run, and remove the added Service.
        let patch = Patch::Merge(json!({ "endpoints": endpoints_json(&bulk_endpoints(0, m)) }));
        slices
            .patch("s-0-1", &PatchParams::default(), &patch)
            .await?;
        services.delete(&added, &DeleteParams::default()).await?;
        slices
            .delete(&format!("{added}-1"), &DeleteParams::default())
            .await?;

        f.first_packet = Some(first_packet(&ns, self.probes)?);
        proxy.sample();
        f.rss_kib = status_kib(pid, "VmHWM:");
        f.child_peak_kib = proxy.child_peak_kib;
        proxy.check_alive()?;
        eprintln!(
            "  {}: first packet {}, peak RSS {} KiB (nft children {} KiB)",
            kind.name(),
            cell(f.first_packet),
            f.rss_kib,
            f.child_peak_kib
        );
        Ok(f)
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 1.0 {
        format!("{v:.1} ms")
    } else {
        format!("{:.0} µs", v * 1000.0)
    }
}

fn cell(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), ms)
}

fn full_cell(r: &Option<Result<Duration, String>>) -> String {
    match r {
        Some(Ok(d)) => ms(*d),
        Some(Err(e)) => e.clone(),
        None => "-".into(),
    }
}

/// `peer / strake`: how many times faster strake-proxy is (a lower bound when the peer timed
/// out after `timeout`).
fn speedup(peer: &Figures, strake: &Figures, timeout: Duration) -> String {
    match (&peer.full_sync, &strake.full_sync) {
        (Some(Ok(p)), Some(Ok(s))) if !s.is_zero() => {
            format!("{:.1}x", p.as_secs_f64() / s.as_secs_f64())
        }
        (Some(Err(_)), Some(Ok(s))) if !s.is_zero() => {
            format!("> {:.0}x", timeout.as_secs_f64() / s.as_secs_f64())
        }
        _ => "-".into(),
    }
}

fn ratio(peer: Option<Duration>, strake: Option<Duration>) -> String {
    match (peer, strake) {
        (Some(p), Some(s)) if !s.is_zero() => {
            format!("{:.1}x", p.as_secs_f64() / s.as_secs_f64())
        }
        _ => "-".into(),
    }
}

type Results = BTreeMap<(usize, usize), BTreeMap<&'static str, Figures>>;

/// kube-proxy's and strake-proxy's figures at one size, when both ran.
fn both<'a>(r: &'a BTreeMap<&'static str, Figures>) -> Option<(&'a Figures, &'a Figures)> {
    Some((r.get(Kind::KubeProxy.name())?, r.get(Kind::Strake.name())?))
}

/// The result tables in Markdown.
fn tables(results: &Results, proxies: &[Kind], timeout: Duration) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let compare = proxies.len() == 2;
    let mut table = |title: &str,
                     value: &dyn Fn(&Figures) -> String,
                     versus: &dyn Fn(&Figures, &Figures) -> String| {
        let _ = writeln!(out, "\n{title}\n");
        let mut head = String::from("| Services x endpoints |");
        let mut sep = String::from("| --- |");
        for k in proxies {
            let _ = write!(head, " {} |", k.name());
            sep.push_str(" --- |");
        }
        if compare {
            head.push_str(" kube-proxy / strake-proxy |");
            sep.push_str(" --- |");
        }
        let _ = writeln!(out, "{head}\n{sep}");
        for ((n, m), r) in results {
            let mut line = format!("| {n} x {m} |");
            for k in proxies {
                let v = r.get(k.name()).map_or_else(|| "-".into(), value);
                let _ = write!(line, " {v} |");
            }
            if compare {
                let v = both(r).map_or_else(|| "-".into(), |(p, s)| versus(p, s));
                let _ = write!(line, " {v} |");
            }
            let _ = writeln!(out, "{line}");
        }
    };
    table(
        "Full sync (process start to first sync done, all objects existing):",
        &|f| full_cell(&f.full_sync),
        &|p, s| speedup(p, s, timeout),
    );
    table(
        "One added Service (API call to its service-ips element committed):",
        &|f| cell(f.add_service),
        &|p, s| ratio(p.add_service, s.add_service),
    );
    table(
        "Of which the API server's answer to the create (the same work for both proxies):",
        &|f| cell(f.add_service_api),
        &|_, _| "-".into(),
    );
    table(
        "One endpoint change (API patch to the new endpoint committed):",
        &|f| cell(f.endpoint_change),
        &|p, s| ratio(p.endpoint_change, s.endpoint_change),
    );
    table(
        "First-packet latency (median TCP connect to a ClusterIP, a new connection each):",
        &|f| cell(f.first_packet),
        &|p, s| ratio(p.first_packet, s.first_packet),
    );
    table(
        "Peak RSS (the proxy's VmHWM; the largest `nft` child's VmHWM seen):",
        &|f| {
            format!(
                "{:.1} MiB; nft {:.1} MiB",
                f.rss_kib as f64 / 1024.0,
                f.child_peak_kib as f64 / 1024.0
            )
        },
        &|p, s| {
            if s.rss_kib > 0 {
                format!("{:.1}x", p.rss_kib as f64 / s.rss_kib as f64)
            } else {
                "-".into()
            }
        },
    );
    let _ = writeln!(out);
    for ((n, m), r) in results {
        for (name, f) in r {
            let _ = writeln!(
                out,
                "{name} at {n} x {m}: {} elements in service-ips after the first sync",
                f.elements
            );
        }
    }
    out
}

/// `strake-bench proxy ...` (see the module documentation).
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = parse_opts(args)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // On SIGINT/SIGTERM the measurement future is dropped, and with it every guard:
        // proxies, node namespaces, the control plane.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = measure_all(&opts) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
}

async fn measure_all(opts: &Opts) -> anyhow::Result<()> {
    eprintln!("starting the control plane ...");
    let cp = ControlPlane::start(Options {
        controllers: false,
        ..Options::default()
    })
    .await?;
    let client = cp.client().await?;
    let logs = tempfile::Builder::new()
        .prefix("strake-bench-proxy-")
        .tempdir()?;
    eprintln!("proxy logs in {}", logs.path().display());
    let certs = cp
        .pki()
        .issue_client("kube-proxy", "system:kube-proxy", &[])?;
    let kubeconfig = logs.path().join("kube-proxy.kubeconfig");
    cp.pki()
        .write_kubeconfig(&kubeconfig, &cp.cluster_server(), &certs)?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": NAMESPACE } }))?,
        )
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    services
        .create(
            &PostParams::default(),
            &service("probe", PROBE_CLUSTER_IP, PROBE_PORT)?,
        )
        .await?;
    slices
        .create(
            &PostParams::default(),
            &slice("probe", &[PROBE_BACKEND], PROBE_PORT)?,
        )
        .await?;
    let mut objects = Objects {
        services,
        slices,
        service_count: 0,
        slice_endpoints: Vec::new(),
    };
    let mut bench = Bench {
        cp: &cp,
        client: client.clone(),
        kubeconfig,
        logs: logs.path().to_path_buf(),
        counter: 0,
        probes: opts.probes.max(1),
    };
    let mut results: Results = BTreeMap::new();
    // Proxies that timed out, with the size at which they did: skipped at larger sizes.
    let mut timed_out: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for &n in &opts.services {
        for &m in &opts.endpoints {
            eprintln!("objects: {n} Services x {m} endpoints ...");
            objects.ensure(n, m).await?;
            for &kind in &opts.proxies {
                let f = if let Some(&(tn, tm)) = timed_out.get(kind.name())
                    && n >= tn
                    && m >= tm
                {
                    Figures {
                        full_sync: Some(Err(format!(
                            "> {} s (at {tn} x {tm} already)",
                            opts.timeout.as_secs()
                        ))),
                        ..Figures::default()
                    }
                } else {
                    eprintln!("measuring {} at {n} x {m} ...", kind.name());
                    let f = bench.measure(kind, n, m, opts.timeout).await?;
                    if matches!(f.full_sync, Some(Err(_))) {
                        timed_out.insert(kind.name(), (n, m));
                    }
                    f
                };
                results.entry((n, m)).or_default().insert(kind.name(), f);
            }
            eprintln!(
                "results so far:\n{}",
                tables(&results, &opts.proxies, opts.timeout)
            );
        }
    }
    print!("{}", tables(&results, &opts.proxies, opts.timeout));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn last_sync_waits_for_every_ip_family() {
        let upstream = "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1.7e+09\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} 0\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds_other 5\n";
        assert_eq!(parse_last_sync(upstream), None);
        let both = upstream.replace("IPv6\"} 0", "IPv6\"} 1700000001.5");
        assert_eq!(parse_last_sync(&both), Some(1_700_000_001.5));
        let strake = "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1700000002.25\n";
        assert_eq!(parse_last_sync(strake), Some(1_700_000_002.25));
        assert_eq!(
            parse_last_sync("kubeproxy_sync_proxy_rules_last_timestamp_seconds 0\n"),
            None
        );
        assert_eq!(parse_last_sync(""), None);
    }

    #[test]
    fn options_parse_and_bench_addresses_stay_apart() {
        let args: Vec<String> = [
            "--services",
            "30000,1000",
            "--endpoints",
            "10,2",
            "--proxies",
            "strake-proxy",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse_opts(&args).unwrap();
        assert_eq!(o.services, [1000, 30000]);
        assert_eq!(o.endpoints, [2, 10]);
        assert_eq!(o.proxies, [Kind::Strake]);
        assert!(parse_opts(&["--endpoints".to_string(), "17".to_string()]).is_err());
        // The largest bulk ClusterIP stays below the added Services' and the probe's.
        assert!(service_ip(MAX_SERVICES) < Ipv4Addr::new(10, 96, 251, 0));
        assert_eq!(endpoint_ip(0, 0), Ipv4Addr::new(10, 128, 0, 1));
        assert_eq!(endpoint_ip(1, 0), Ipv4Addr::new(10, 128, 0, 17));
    }

    #[test]
    fn endpoint_addresses_are_found_in_either_proxys_chains() {
        let upstream = "meta l4proto tcp dnat ip to numgen random mod 2 map \
                        { 0 : 10.128.0.1 . 8080, 1 : 10.128.0.2 . 8080 }";
        assert!(names_ip(upstream, "10.128.0.2"));
        assert!(!names_ip(upstream, "10.128.0.21"));
        let strake = "10.96.16.1 . tcp . 80 . 1 : 10.128.0.21 . 8080,";
        assert!(names_ip(strake, "10.128.0.21"));
        assert!(!names_ip(strake, "10.128.0.2"));
        let ip = Ipv4Addr::new(10, 127, 3, 1);
        assert!(carries_ip(b"..\x0a\x7f\x03\x01..", ip));
        assert!(carries_ip(b"ep-x__10.127.3.1/8080", ip));
        assert!(!carries_ip(b"10.127.3.10", Ipv4Addr::new(10, 127, 3, 2)));
    }
}
