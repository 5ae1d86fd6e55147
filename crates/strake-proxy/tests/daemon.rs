//! The `strake-proxy` binary as a daemon against a real control plane (test bed; needs root and
//! `make testbed`): Services and EndpointSlices created, changed and deleted through the API
//! show up in the data plane of a node namespace, a restart drops no request, an API outage
//! keeps the rules and the missed change is programmed on reconnect, health and metrics
//! answer, `--cleanup` removes the proxy's tables and nothing else, and model warnings become
//! Events.
//!
//! ```text
//!  cluster netns: kube-apiserver 10.213.0.1:6443
//!        │ veth
//!  node netns: eth0 10.213.0.10, strake-proxy, br0 10.244.0.1/24 ─┬─ backend 10.244.0.11/32
//!                                                                  ├─ backend 10.244.0.12/32
//!                                                                  └─ client  10.244.0.20/32
//! ```
//!
//! The proxy runs as upstream's kube-proxy identity (`system:kube-proxy`, bound by default to
//! the `system:node-proxier` ClusterRole: list/watch Services, EndpointSlices and Nodes, write
//! Events), from a client certificate issued by the test bed's CA.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::netns::{NetNs, NodeNs};
use strake_integration::process::Daemon;

const NODE_NAME: &str = "proxy-node";
const CLUSTER_IP: &str = "10.96.100.10";
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// An HTTP/1.0 GET with `busybox nc` from inside `ns`: (status line, body), or what went wrong.
/// (`busybox wget` from Debian's busybox-static segfaults; the request is written by hand.)
fn http(ns: &NetNs, addr: &str, path: &str) -> Result<(String, String), String> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut child = ns
        .command("/bin/busybox")
        .args(["nc", "-w", "2", host, port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        let _ = stdin.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") => Ok((
            head.lines().next().unwrap_or_default().to_string(),
            body.trim().to_string(),
        )),
        _ => Err(format!(
            "{}{}",
            text,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A TCP connection made from inside a network namespace (a thread entered it to connect;
/// the socket stays in that namespace).
struct Echo(std::io::BufReader<std::net::TcpStream>);

impl Echo {
    fn connect(ns: &NetNs, addr: &str) -> Echo {
        let path = ns.path();
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let stream = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns(2) on an open namespace file; it affects this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
        })
        .join()
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Echo(std::io::BufReader::new(stream))
    }

    /// Sends one line and reads the echoed line back.
    fn round_trip(&mut self, line: &str) -> String {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.0.get_mut(), "{line}").unwrap();
        let mut back = String::new();
        self.0.read_line(&mut back).unwrap();
        back.trim_end().to_string()
    }
}

/// The body of a GET to the ClusterIP from the client pod.
fn via_service(client: &NetNs) -> Result<String, String> {
    http(client, &format!("{CLUSTER_IP}:80"), "/").map(|(_, body)| body)
}

/// The backends that answer `tries` requests to the ClusterIP.
fn spread(client: &NetNs, tries: usize) -> Result<BTreeMap<String, usize>, String> {
    let mut seen = BTreeMap::new();
    for _ in 0..tries {
        *seen.entry(via_service(client)?).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Polls `f` every 10 ms until it yields a value; panics (with the proxy's log) after `secs`.
fn wait_for<T>(what: &str, secs: u64, proxy: &Daemon, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}; proxy log:\n{}",
            proxy.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pod namespace on the node's bridge with a /32 address routed via the node.
fn pod(node: &NodeNs, index: usize, ip: &str) -> NetNs {
    let ns = NetNs::create("pod").unwrap();
    let host_end = format!("vp{index}");
    node.ns()
        .ip(&[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])
        .unwrap();
    node.ns()
        .ip(&["link", "set", &host_end, "master", "br0", "up"])
        .unwrap();
    for args in [
        vec!["addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["route", "add", "10.244.0.1", "dev", "eth0", "scope", "link"],
        vec![
            "route",
            "add",
            "default",
            "via",
            "10.244.0.1",
            "dev",
            "eth0",
        ],
    ] {
        ns.ip(&args).unwrap();
    }
    // Replies must go back through the node's conntrack, not around it.
    ns.run(
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.eth0.accept_redirects=0"],
    )
    .unwrap();
    ns
}

fn web_service() -> Service {
    serde_json::from_value(json!({
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "clusterIP": CLUSTER_IP,
            "ports": [
                { "name": "http", "port": 80, "protocol": "TCP" },
                { "name": "echo", "port": 7, "protocol": "TCP" },
            ],
        },
    }))
    .unwrap()
}

fn web_slice(ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({ "addresses": [ip], "nodeName": NODE_NAME, "conditions": { "ready": true } }))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": "web-1",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "strake-proxy-test",
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": Timestamp::now().to_string(),
            },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "http", "port": 80, "protocol": "TCP" },
            { "name": "echo", "port": 7007, "protocol": "TCP" },
        ],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn nft(ns: &NetNs, args: &[&str]) -> String {
    String::from_utf8_lossy(&ns.run("/usr/sbin/nft", args).unwrap().stdout).into_owned()
}

const BACKEND_IPS: [&str; 2] = ["10.244.0.11", "10.244.0.12"];

/// A control plane, a node with two web backends and a client pod, and strake-proxy running
/// in the node. Fields drop in declaration order: the proxy and web servers stop first, then
/// the pod namespaces go, then the node, then the control plane.
struct Bed {
    proxy: Daemon,
    _servers: Vec<Daemon>,
    client: NetNs,
    _backends: Vec<NetNs>,
    node: NodeNs,
    dir: tempfile::TempDir,
    cp: ControlPlane,
}

/// Starts strake-proxy in `node` with the kubeconfig and config file in `dir`.
fn spawn_proxy(node: &NetNs, dir: &Path) -> Daemon {
    let mut cmd = node.command(bin());
    cmd.arg(format!(
        "--kubeconfig={}",
        dir.join("kube-proxy.kubeconfig").display()
    ))
    .arg(format!(
        "--config={}",
        dir.join("kube-proxy.yaml").display()
    ))
    .arg(format!("--hostname-override={NODE_NAME}"))
    .arg("--healthz-bind-address=127.0.0.1:10256")
    .arg("--log-level=debug");
    Daemon::spawn("strake-proxy", cmd, &dir.join("proxy.log")).unwrap()
}

/// Waits until `/healthz` says 200 with a `lastUpdated` later than `after` (or than never).
fn wait_first_sync(node: &NetNs, proxy: &mut Daemon, after: Option<Timestamp>) -> Timestamp {
    let after = after.unwrap_or(Timestamp::UNIX_EPOCH);
    let last = wait_for("a sync", 30, proxy, || {
        let (status, body) = http(node, HEALTHZ, "/healthz").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let last: Timestamp = v["lastUpdated"].as_str()?.parse().ok()?;
        (status.contains(" 200 ") && v["currentTime"].is_string() && last > after).then_some(last)
    });
    proxy.check_running().unwrap();
    last
}

impl Bed {
    async fn start() -> Bed {
        let cp = ControlPlane::start(Options {
            controllers: false,
            ..Options::default()
        })
        .await
        .unwrap();
        let node = cp.net().add_node(0).unwrap();
        let dir = tempfile::tempdir().unwrap();

        // The node: a bridge for its pods, forwarding on.
        let n = node.ns();
        n.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        n.ip(&["addr", "add", "10.244.0.1/24", "dev", "br0"])
            .unwrap();
        n.ip(&["link", "set", "br0", "up"]).unwrap();
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.br0.send_redirects=0",
        ] {
            n.run("sysctl", &["-q", "-w", setting]).unwrap();
        }
        for knob in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
            if Path::new(&format!("/proc/sys/net/bridge/{knob}")).exists() {
                n.run("sysctl", &["-q", "-w", &format!("net.bridge.{knob}=0")])
                    .unwrap();
            }
        }
        let backends: Vec<NetNs> = BACKEND_IPS
            .iter()
            .enumerate()
            .map(|(i, ip)| pod(&node, i, ip))
            .collect();
        let client = pod(&node, 9, "10.244.0.20");
        let mut servers = Vec::new();
        for (i, ns) in backends.iter().enumerate() {
            let www = dir.path().join(format!("b{i}"));
            std::fs::create_dir(&www).unwrap();
            std::fs::write(www.join("index.html"), format!("backend-{i}\n")).unwrap();
            let mut cmd = ns.command("/bin/busybox");
            cmd.args(["httpd", "-f", "-p", "80", "-h"]).arg(&www);
            servers.push(
                Daemon::spawn(&format!("httpd-{i}"), cmd, &dir.path().join("httpd.log")).unwrap(),
            );
            // A TCP echo service for long-lived connections.
            let mut cmd = ns.command("/bin/busybox");
            cmd.args(["nc", "-ll", "-p", "7007", "-e", "/bin/cat"]);
            servers.push(
                Daemon::spawn(&format!("echo-{i}"), cmd, &dir.path().join("echo.log")).unwrap(),
            );
        }

        // The proxy, as system:kube-proxy, configured by flags and a KubeProxyConfiguration.
        let certs = cp
            .pki()
            .issue_client("kube-proxy", "system:kube-proxy", &[])
            .unwrap();
        let kubeconfig = dir.path().join("kube-proxy.kubeconfig");
        cp.pki()
            .write_kubeconfig(&kubeconfig, &cp.cluster_server(), &certs)
            .unwrap();
        let config = dir.path().join("kube-proxy.yaml");
        std::fs::write(
            &config,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: nftables\nclusterCIDR: 10.244.0.0/16\nmetricsBindAddress: 127.0.0.1:10249\n\
             nftables:\n  syncPeriod: 10s\n  minSyncPeriod: 100ms\n",
        )
        .unwrap();
        let mut proxy = spawn_proxy(n, dir.path());
        wait_first_sync(n, &mut proxy, None);
        Bed {
            proxy,
            _servers: servers,
            client,
            _backends: backends,
            node,
            dir,
            cp,
        }
    }

    fn n(&self) -> &NetNs {
        self.node.ns()
    }

    async fn apis(&self) -> (Api<Service>, Api<EndpointSlice>) {
        let client = self.cp.client().await.unwrap();
        (
            Api::namespaced(client.clone(), "default"),
            Api::namespaced(client, "default"),
        )
    }

    /// Waits until the proxy's IPv4 table satisfies `pred`; returns how long that took.
    fn wait_rules(&self, what: &str, pred: impl Fn(&str) -> bool) -> Duration {
        let started = Instant::now();
        wait_for(what, 20, &self.proxy, || {
            pred(&nft(self.n(), &["list", "table", "ip", "strake-proxy"])).then_some(())
        });
        started.elapsed()
    }

    /// Waits until `tries` requests to the ClusterIP are all answered by exactly `backends`.
    fn wait_traffic(&self, what: &str, backends: &[&str], tries: usize) {
        wait_for(what, 20, &self.proxy, || {
            let seen = spread(&self.client, tries).ok()?;
            (seen.keys().map(String::as_str).collect::<Vec<_>>() == backends).then_some(())
        });
    }
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_strake-proxy"))
}

const SERVICE_ELEMENT: &str = "10.96.100.10 . tcp . 80 : goto";

#[tokio::test]
async fn follows_the_api_serves_health_and_metrics_and_cleans_up() {
    let mut bed = Bed::start().await;
    let (status, _) = http(bed.n(), HEALTHZ, "/livez").unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let (services, slices) = bed.apis().await;

    // A Service with two endpoints, through the API: both answer at the ClusterIP.
    let started = Instant::now();
    services
        .create(&PostParams::default(), &web_service())
        .await
        .unwrap();
    slices
        .create(&PostParams::default(), &web_slice(&BACKEND_IPS))
        .await
        .unwrap();
    let api_done = started.elapsed();
    let programmed = bed.wait_rules("the Service's rules", |t| {
        t.contains(SERVICE_ELEMENT) && t.contains(": 10.244.0.12 . 80")
    });
    eprintln!(
        "figure: Service + EndpointSlice created ({api_done:?}) -> rules programmed {programmed:?} later"
    );
    bed.wait_traffic(
        "traffic over both backends",
        &["backend-0", "backend-1"],
        20,
    );

    // A restart under traffic: the kernel keeps serving the old rules while the proxy is
    // down, and the new process's first sync (full, one transaction) replaces them without a
    // gap: no request fails.
    let before = wait_first_sync(bed.node.ns(), &mut bed.proxy, None);
    // An established connection through the ClusterIP, opened before the restart.
    let mut echo = Echo::connect(&bed.client, &format!("{CLUSTER_IP}:7"));
    assert_eq!(echo.round_trip("before the restart"), "before the restart");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| {
        let hammer = s.spawn(|| {
            let (mut ok, mut failed) = (0, Vec::new());
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                match via_service(&bed.client) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        });
        bed.proxy.stop(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        bed.proxy = spawn_proxy(bed.node.ns(), bed.dir.path());
        wait_first_sync(bed.node.ns(), &mut bed.proxy, Some(before));
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        hammer.join().unwrap()
    });
    assert!(failed.is_empty() && ok > 10, "{ok} ok, failed: {failed:?}");
    eprintln!("figure: {ok} requests across a proxy restart, none failed");
    // The connection opened before the restart still carries data both ways.
    assert_eq!(echo.round_trip("after the restart"), "after the restart");
    drop(echo);

    // One endpoint dropped: traffic follows.
    let mut slice = slices.get("web-1").await.unwrap();
    slice
        .endpoints
        .as_mut()
        .unwrap()
        .retain(|e| e.addresses[0] == BACKEND_IPS[1]);
    slice.metadata.annotations.get_or_insert_default().insert(
        "endpoints.kubernetes.io/last-change-trigger-time".into(),
        Timestamp::now().to_string(),
    );
    slices
        .replace("web-1", &PostParams::default(), &slice)
        .await
        .unwrap();
    let programmed = bed.wait_rules("backend-0 gone from the rules", |t| {
        !t.contains(": 10.244.0.11 . 80")
    });
    eprintln!("figure: endpoint removed -> rules programmed in {programmed:?}");
    bed.wait_traffic("traffic to leave backend-0", &["backend-1"], 10);

    // The Service deleted: the ClusterIP no longer leads anywhere.
    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let programmed = bed.wait_rules("the Service gone from the rules", |t| {
        !t.contains(CLUSTER_IP)
    });
    eprintln!("figure: Service deleted -> rules programmed in {programmed:?}");
    let err = via_service(&bed.client).unwrap_err();
    assert!(
        err.contains("timed out") || err.contains("refused") || err.contains("unreachable"),
        "{err}"
    );
    // The `kubernetes` Service, programmed from the API server's own EndpointSlice.
    let listing = nft(bed.n(), &["list", "table", "ip", "strake-proxy"]);
    assert!(listing.contains("10.96.0.1 . tcp . 443"), "{listing}");

    // Operations: metrics with upstream's names, the proxy mode.
    let (status, metrics) = http(bed.n(), METRICS, "/metrics").unwrap();
    assert!(status.contains(" 200 "), "{status}");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no value:\n{metrics}"))
    };
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0);
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 2.0);
    // Counted since the restart above: the endpoint change and the Service deletion.
    assert!(value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 2.0);
    // The changed slice carried a trigger time.
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert_eq!(http(bed.n(), METRICS, "/proxyMode").unwrap().1, "nftables");

    // Stopping the proxy leaves its rules in place (traffic survives a restart)...
    bed.proxy.stop(Duration::from_secs(10));
    assert!(nft(bed.n(), &["list", "tables"]).contains("table ip strake-proxy"));
    assert!(
        bed.proxy.log_tail(100).contains("strake-proxy stopped"),
        "{}",
        bed.proxy.log_tail(20)
    );
    // ...and `--cleanup` removes its tables, and only those.
    bed.n()
        .run("/usr/sbin/nft", &["add", "table", "ip", "decoy"])
        .unwrap();
    let out = bed
        .n()
        .command(bin())
        .arg("--cleanup")
        .arg(format!("--hostname-override={NODE_NAME}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = nft(bed.n(), &["list", "tables"]);
    assert!(tables.contains("table ip decoy"), "{tables}");
    assert!(!tables.contains("strake-proxy"), "{tables}");
}

#[tokio::test]
async fn keeps_rules_through_an_api_outage_and_resyncs_on_reconnect() {
    let bed = Bed::start().await;
    let (services, slices) = bed.apis().await;
    services
        .create(&PostParams::default(), &web_service())
        .await
        .unwrap();
    slices
        .create(&PostParams::default(), &web_slice(&BACKEND_IPS))
        .await
        .unwrap();
    bed.wait_traffic(
        "traffic over both backends",
        &["backend-0", "backend-1"],
        20,
    );

    // Outage: the node can no longer reach the API server (connections reset, new ones
    // refused). A decoy table of the test's own, removed afterwards.
    let n = bed.n();
    let script = "add table ip outage\n\
        add chain ip outage out { type filter hook output priority 0 ; }\n\
        add rule ip outage out ip daddr 10.213.0.1 tcp dport 6443 reject with tcp reset\n";
    let mut cmd = n.command("/usr/sbin/nft");
    cmd.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    n.run("ss", &["-K", "dst", "10.213.0.1", "dport", "=", "6443"])
        .unwrap();
    wait_for("the proxy to notice the outage", 20, &bed.proxy, || {
        bed.proxy
            .log_tail(200)
            .contains("watch failed; keeping the current rules")
            .then_some(())
    });

    // Changed meanwhile: invisible to the proxy, whose rules keep serving both backends.
    let mut slice = slices.get("web-1").await.unwrap();
    slice
        .endpoints
        .as_mut()
        .unwrap()
        .retain(|e| e.addresses[0] == BACKEND_IPS[1]);
    slices
        .replace("web-1", &PostParams::default(), &slice)
        .await
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let seen = spread(&bed.client, 20).unwrap();
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );
    let (status, _) = http(n, HEALTHZ, "/healthz").unwrap();
    assert!(status.contains(" 200 "), "{status}");

    // Back: the watchers relist and the change is programmed.
    n.run("/usr/sbin/nft", &["delete", "table", "ip", "outage"])
        .unwrap();
    let started = Instant::now();
    bed.wait_traffic("the change made during the outage", &["backend-1"], 10);
    eprintln!(
        "figure: API back -> missed change programmed in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn model_warnings_become_events_on_the_service_as_kube_proxy() {
    let cp = ControlPlane::start(Options {
        controllers: false,
        ..Options::default()
    })
    .await
    .unwrap();
    // The kube-proxy identity, through the root namespace's loopback forwarder.
    let admin = kube::config::Kubeconfig::read_from(cp.kubeconfig()).unwrap();
    let server = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .unwrap();
    let certs = cp
        .pki()
        .issue_client("kube-proxy-events", "system:kube-proxy", &[])
        .unwrap();
    let kubeconfig = cp.dir().join("kube-proxy-events.kubeconfig");
    cp.pki()
        .write_kubeconfig(&kubeconfig, &server, &certs)
        .unwrap();
    let as_proxy = strake_integration::control_plane::client_from(&kubeconfig)
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(cp.client().await.unwrap(), "default");
    services
        .create(&PostParams::default(), &web_service())
        .await
        .unwrap();

    let mut reporter = strake_proxy::sync_loop::WarningReporter::new(Some(as_proxy), NODE_NAME);
    let warning = strake_proxy::model::Warning {
        kind: "Service",
        namespace: "default".into(),
        name: "web".into(),
        reason: "InvalidClusterIP",
        message: "clusterIP \"x\" is not an IP address".into(),
    };
    assert_eq!(reporter.report(std::slice::from_ref(&warning), None), 1);
    // Rate-limited: the same warning again is neither logged nor reported.
    assert_eq!(reporter.report(std::slice::from_ref(&warning), None), 0);

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cp.client().await.unwrap(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let list = events.list(&Default::default()).await.unwrap();
        if let Some(e) = list.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
                && e.reason.as_deref() == Some("InvalidClusterIP")
        }) {
            break e;
        }
        assert!(Instant::now() < deadline, "no Event for default/web");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reporting_controller.as_deref(), Some("strake-proxy"));
    assert_eq!(event.reporting_instance.as_deref(), Some(NODE_NAME));
    let regarding = event.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("Service"));
    assert_eq!(regarding.api_version.as_deref(), Some("v1"));
}

#[tokio::test]
async fn health_check_node_port_reports_local_endpoints() {
    let bed = Bed::start().await;
    let (services, slices) = bed.apis().await;
    let lb: Service = serde_json::from_value(json!({
        "metadata": { "name": "lb", "namespace": "default" },
        "spec": {
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }],
        },
    }))
    .unwrap();
    let lb = services.create(&PostParams::default(), &lb).await.unwrap();
    let hc = lb
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .expect("the API server allocates a healthCheckNodePort");
    let mut slice = web_slice(&BACKEND_IPS);
    slice.metadata.name = Some("lb-1".into());
    slice
        .metadata
        .labels
        .get_or_insert_default()
        .insert("kubernetes.io/service-name".into(), "lb".into());
    slices.create(&PostParams::default(), &slice).await.unwrap();
    let addr = format!("127.0.0.1:{hc}");
    let body = wait_for("the health-check node port", 20, &bed.proxy, || {
        let (status, body) = http(bed.n(), &addr, "/").ok()?;
        status.contains(" 200 ").then_some(body)
    });
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 2, "{v}");
    assert_eq!(v["service"]["name"], "lb", "{v}");

    // The endpoints move to another node: this node has none left for the Service.
    let mut slice = slices.get("lb-1").await.unwrap();
    for e in slice.endpoints.as_mut().unwrap() {
        e.node_name = Some("elsewhere".into());
    }
    slices
        .replace("lb-1", &PostParams::default(), &slice)
        .await
        .unwrap();
    let body = wait_for(
        "503 from the health-check node port",
        20,
        &bed.proxy,
        || {
            let (status, body) = http(bed.n(), &addr, "/").ok()?;
            status.contains(" 503 ").then_some(body)
        },
    );
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    // The Service deleted: the port closes.
    services
        .delete("lb", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the health-check node port to close",
        20,
        &bed.proxy,
        || http(bed.n(), &addr, "/").is_err().then_some(()),
    );
}
