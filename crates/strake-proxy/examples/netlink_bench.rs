//! The cost of a sync from "the sync loop decides to sync" to "the kernel has it", through the
//! netlink backend (or `nft -f` with `--text`), for N Services x M endpoints, inside a
//! throwaway network namespace (needs root; never touches the caller's namespace).
//!
//! `cargo run --release -p strake-proxy --example netlink_bench -- [SERVICES] [ENDPOINTS] [--text] [--full-only]`
//!
//! `--full-only` exits right after the first full sync, without freeing anything: under
//! `heaptrack`, the memory "leaked" at exit is what the daemon keeps after a full sync.
//!
//! Each step runs the daemon's whole pipeline (the incremental model and ruleset, then the
//! kernel): a full sync given every object (`Programmer::sync`), then partial ones given only
//! the changed objects, as the daemon's watches name them (`Programmer::sync_changed`), for
//! one endpoint added, one removed, one Service added (5 rounds each, median shown), then a
//! forced full sync over the full table.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use strake_proxy::config::Config;
use strake_proxy::model::IpFamily;
use strake_proxy::model::{self, Interner, ServiceObject, SliceObject};
use strake_proxy::nft::netlink::NftNetlink;
use strake_proxy::nft::netlink::encode;
use strake_proxy::nft::objects::{Key, Rule, Value, Verdict};
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::transaction::{Command as Op, Transaction, full_transaction};
use strake_proxy::nft::{Nft, NftCommand};
use strake_proxy::programmer::{Changed, Programmer};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn service(i: u32) -> Service {
    // 62,500 addresses per /16, from 10.96.1.1 on (endpoints are in 10.128.0.0/9).
    let ip = format!(
        "10.{}.{}.{}",
        96 + i / 62_500,
        1 + (i / 250) % 250,
        1 + i % 250
    );
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": format!("svc-{i}") },
        "spec": { "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80 }] },
    }))
    .unwrap()
}

fn endpoint_ip(n: u32) -> String {
    format!(
        "10.{}.{}.{}",
        128 + n / 62_500,
        (n / 250) % 250,
        1 + n % 250
    )
}

fn slice(i: u32, endpoints: u32) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| json!({ "addresses": [endpoint_ip(i * endpoints + e)], "nodeName": "n1" }))
        .collect();
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": format!("svc-{i}-1"), "labels": { "kubernetes.io/service-name": format!("svc-{i}") } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": eps,
    }))
    .unwrap()
}

/// CPU time (user + system) of the calling thread: the kernel's work on a netlink batch runs
/// inside our `sendmsg`, so it is counted here too. Less disturbed than wall time on a busy
/// machine (a `nft -f` child's time is not counted: compare those by wall time).
fn cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Times each `apply` of the backend it wraps: (wall, CPU).
struct Timed<'a> {
    inner: &'a dyn Nft,
    last: std::sync::Mutex<(Duration, Duration)>,
}

impl Nft for Timed<'_> {
    fn apply(&self, tx: &Transaction<'_>) -> Result<usize, strake_proxy::nft::NftError> {
        let (t, c) = (Instant::now(), cpu());
        let result = self.inner.apply(tx);
        *self.last.lock().unwrap() = (t.elapsed(), cpu() - c);
        result
    }

    fn list_table(
        &self,
        family: strake_proxy::model::IpFamily,
        name: &str,
    ) -> Result<String, strake_proxy::nft::NftError> {
        self.inner.list_table(family, name)
    }
}

struct Bench<'a> {
    config: Config,
    nft: &'a Timed<'a>,
    programmer: Programmer,
}

impl Bench<'_> {
    /// One pass of the daemon's sync pipeline, given every object.
    fn sync(&mut self, svcs: &[Arc<ServiceObject>], slices: &[Arc<SliceObject>]) -> Sample {
        self.timed(|p, nft| p.sync(nft, svcs, slices, None).unwrap())
    }

    /// One pass of the daemon's sync pipeline, given the objects that changed (as the
    /// daemon's watches name them).
    fn sync_changed(
        &mut self,
        svcs: Vec<Changed<ServiceObject>>,
        slices: Vec<Changed<SliceObject>>,
    ) -> Sample {
        self.timed(|p, nft| p.sync_changed(nft, svcs, slices, None).unwrap())
    }

    fn timed(
        &mut self,
        sync: impl FnOnce(&mut Programmer, &dyn Nft) -> strake_proxy::nft::transaction::SyncReport,
    ) -> Sample {
        let (t, c) = (Instant::now(), cpu());
        *self.nft.last.lock().unwrap() = (Duration::ZERO, Duration::ZERO);
        let report = sync(&mut self.programmer, self.nft);
        let w = self.programmer.warnings();
        assert!(w.is_empty(), "{:?}", &w[..w.len().min(3)]);
        let (apply, apply_cpu) = *self.nft.last.lock().unwrap();
        Sample {
            total: t.elapsed(),
            total_cpu: cpu() - c,
            apply,
            apply_cpu,
            bytes: report.bytes,
            full: report.full,
        }
    }
}

/// One sync: wall and CPU time of the whole pipeline and of the backend's apply.
#[derive(Clone, Copy)]
struct Sample {
    total: Duration,
    total_cpu: Duration,
    apply: Duration,
    apply_cpu: Duration,
    bytes: usize,
    full: bool,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "total {:.1?} (cpu {:.1?}), of which apply {:.1?} (cpu {:.1?}); {} bytes sent",
            self.total, self.total_cpu, self.apply, self.apply_cpu, self.bytes
        )
    }
}

/// A figure of `/proc/self/status` (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = args.iter().any(|a| a == "--text");
    let mut nums = args.iter().filter_map(|a| a.parse::<u32>().ok());
    let services = nums.next().unwrap_or(10_000);
    let endpoints = nums.next().unwrap_or(10);

    let ns = Netns(format!("sproxy-bench-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let path = format!("/run/netns/{}", ns.0);
    let backend: Box<dyn Nft> = if text {
        Box::new(NftCommand::in_netns(&path).with_program("/usr/sbin/nft"))
    } else {
        Box::new(NftNetlink::in_netns(&path).with_list_program("/usr/sbin/nft"))
    };
    let nft = Timed {
        inner: backend.as_ref(),
        last: std::sync::Mutex::new((Duration::ZERO, Duration::ZERO)),
    };
    let config = Config {
        node_name: "n1".into(),
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    };
    let mut bench = Bench {
        programmer: Programmer::new(&config),
        config,
        nft: &nft,
    };
    // The objects as the daemon's watches keep them.
    let mut interner = Interner::default();
    let kept_service = |i| Arc::new(ServiceObject::new(&service(i)));
    let mut kept_slice = |s: &EndpointSlice| Arc::new(SliceObject::new(s, &mut interner));
    let mut svcs: Vec<Arc<ServiceObject>> = (0..services).map(kept_service).collect();
    let mut slices: Vec<Arc<SliceObject>> = (0..services)
        .map(|i| kept_slice(&slice(i, endpoints)))
        .collect();
    println!(
        "{services} Services x {endpoints} endpoints, backend {}",
        if text { "nft -f" } else { "netlink" }
    );

    let objects = status_mib("VmRSS:");
    let first = bench.sync(&svcs, &slices);
    assert!(first.full);
    println!("full sync (empty table): {first}");
    // The objects stand for the daemon's watch stores.
    println!(
        "  peak RSS {:.1} MiB after the full sync, of which {objects:.1} MiB before it (the objects); {:.1} MiB resident after it",
        status_mib("VmHWM:"),
        status_mib("VmRSS:")
    );
    if args.iter().any(|a| a == "--full-only") {
        // For heap profilers: what is still allocated at exit is what a full sync keeps.
        std::process::exit(0);
    }
    if !text {
        let (m, _) = model::build_from_objects(
            svcs.iter().map(|s| s.as_ref()),
            slices.iter().map(|s| s.as_ref()),
            None,
            &bench.config,
        );
        let r = Ruleset::build(&m, &bench.config);
        let t = Instant::now();
        let tx = full_transaction(&r);
        let t_plan = t.elapsed();
        let t = Instant::now();
        let batch = encode::encode(&tx, 1).unwrap();
        let t_encode = t.elapsed();
        let t = Instant::now();
        let script = tx.to_string();
        println!(
            "  of a full sync: transaction {t_plan:?}, netlink encoding {t_encode:?} ({} bytes, {} messages); as nft text {:?} ({} bytes)",
            batch.bytes.len(),
            batch.commands.len(),
            t.elapsed(),
            script.len(),
        );
    }

    if !text {
        // What the kernel charges for tiny transactions on a table this size.
        let v4 = IpFamily::V4;
        let ip = Key::Addr("10.99.0.1".parse().unwrap());
        let (drop, jump) = (
            Rule::from(Verdict::Drop),
            Rule::from(Verdict::jump("mark-for-masquerade")),
        );
        let chain = |name| Op::AddChain {
            family: v4,
            name,
            base: None,
        };
        let rule = |rule| Op::AddRule {
            family: v4,
            chain: "probe",
            rule,
        };
        let probes: [(&str, Vec<Op<'_>>); 6] = [
            (
                "add a set element",
                vec![Op::AddElements {
                    family: v4,
                    set: "cluster-ips",
                    elements: vec![(&ip, &Value::None)],
                }],
            ),
            ("add an empty chain", vec![chain("probe")]),
            ("add a rule: drop", vec![rule(&drop)]),
            ("add a rule: jump", vec![rule(&jump)]),
            (
                "flush and delete the chain",
                vec![
                    Op::FlushChain {
                        family: v4,
                        name: "probe",
                    },
                    Op::DeleteChain {
                        family: v4,
                        name: "probe",
                    },
                ],
            ),
            (
                "delete the set element",
                vec![Op::DeleteElements {
                    family: v4,
                    set: "cluster-ips",
                    keys: vec![&ip],
                }],
            ),
        ];
        for (what, commands) in probes {
            let (t, c) = (Instant::now(), cpu());
            backend.apply(&Transaction { commands }).unwrap();
            println!(
                "  kernel probe, {what}: {:.1?} (cpu {:.1?})",
                t.elapsed(),
                cpu() - c
            );
        }
    }

    let rounds = 5;
    let last = (services - 1) as usize;
    let report = |name: &str, samples: Vec<Sample>| {
        assert!(
            samples.iter().all(|s| !s.full),
            "{name}: a partial sync was full"
        );
        let m = |f: fn(&Sample) -> Duration| median(samples.iter().map(f).collect());
        let sample = Sample {
            total: m(|s| s.total),
            total_cpu: m(|s| s.total_cpu),
            apply: m(|s| s.apply),
            apply_cpu: m(|s| s.apply_cpu),
            bytes: samples[0].bytes,
            full: false,
        };
        println!("{name}: {sample}; medians of {rounds}");
    };

    let mut added = Vec::new();
    let mut removed = Vec::new();
    for round in 0..rounds {
        // One endpoint added to the last Service...
        let mut grown = slice(last as u32, endpoints);
        grown.endpoints.as_mut().unwrap().push(
            serde_json::from_value(
                json!({ "addresses": [format!("10.255.{round}.1")], "nodeName": "n1" }),
            )
            .unwrap(),
        );
        slices[last] = kept_slice(&grown);
        let name = |s: &Arc<SliceObject>| (s.namespace.clone(), s.name.clone());
        added.push(bench.sync_changed(
            vec![],
            vec![(name(&slices[last]), Some(slices[last].clone()))],
        ));
        // ...and removed again.
        slices[last] = kept_slice(&slice(last as u32, endpoints));
        removed.push(bench.sync_changed(
            vec![],
            vec![(name(&slices[last]), Some(slices[last].clone()))],
        ));
    }
    report("one endpoint added", added);
    report("one endpoint removed", removed);

    let mut new_service = Vec::new();
    for round in 0..rounds as u32 {
        let i = services + round;
        let (svc, sl) = (kept_service(i), kept_slice(&slice(i, endpoints)));
        svcs.push(svc.clone());
        slices.push(sl.clone());
        new_service.push(bench.sync_changed(
            vec![(svc.key(), Some(svc))],
            vec![((sl.namespace.clone(), sl.name.clone()), Some(sl))],
        ));
    }
    report("one Service added", new_service);

    bench.programmer.force_full();
    let again = bench.sync(&svcs, &slices);
    assert!(again.full);
    println!("full sync (replacing a full table): {again}");
}
