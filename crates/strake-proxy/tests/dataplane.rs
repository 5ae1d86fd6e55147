//! Real data-plane tests: real nftables, real traffic, all inside network namespaces these
//! tests create (needs root). Nothing is ever added to the caller's network namespace.
//!
//! ```text
//!  client pod 10.244.0.20/32 ─┐                                   ┌─ backend 10.244.0.11/32
//!                              ├─ br0 10.244.0.1/24 [node netns] ──┼─ backend 10.244.0.12/32
//!                              │   eth0 192.168.77.1/24            └─ backend 10.244.0.13/32
//!                              │        │ veth
//!                              │   external host 192.168.77.2/24
//! ```
//!
//! Pods have a /32 address and a default route via the node, so pod-to-pod traffic (and the
//! replies of DNATed connections) is routed through the node namespace, where conntrack undoes
//! the DNAT; no `br_netfilter` is needed. The proxy's tables live in the node namespace.
//!
//! UDP tests use a tiny UDP server and client (the `strake-proxy-test-udp` helper binary, run
//! inside a namespace through `nsenter`): the client keeps its source port, so every
//! datagram belongs to one conntrack flow, which is what stale-flow cleanup is about.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use strake_proxy::config::{Config, NodePortAddresses};
use strake_proxy::conntrack::{self, ConntrackCommand, Deletion, UdpState};
use strake_proxy::model::{self, IpFamily};
use strake_proxy::nft::netlink::NftNetlink;
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::{Nft, TABLE};
use strake_proxy::programmer::Programmer;

mod common;
use common::Applied;

const PREFIX: &str = "sproxy";
const NODE_NAME: &str = "node-a";
const CLUSTER_IP: &str = "10.96.0.10";
const NODE_EXTERNAL_IP: &str = "192.168.77.1";
const EXTERNAL_IP: &str = "192.168.77.2";
const NODE_PORT: u16 = 30080;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace pinned under /run/netns, deleted on drop.
struct Ns {
    name: String,
}

impl Ns {
    fn create(role: &str) -> Ns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{role}{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// A command running `program` in this network namespace only.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    fn sysctl(&self, setting: &str) {
        run(self.command("sysctl").args(["-q", "-w", setting]));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// Cleans up after earlier runs of these tests that were killed before their guards ran:
/// their processes (found by network namespace, stopped by PID), namespaces and web roots.
/// Only names carrying our prefix and the PID of a process that is gone are touched.
fn sweep_stale() {
    let stale_owner = |name: &str| -> bool {
        name.strip_prefix(&format!("{PREFIX}-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale_owner(&name) {
                continue;
            }
            if let Ok(ns) = std::fs::metadata(entry.path()) {
                for pid in pids_in_netns(std::os::unix::fs::MetadataExt::ino(&ns)) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.filter_map(|e| e.ok()) {
            if stale_owner(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// PIDs of the processes whose network namespace has inode `ino`.
fn pids_in_netns(ino: u64) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
        })
        .collect()
}

/// A process started by a test, killed (by its own PID) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test world. Field order is drop order: processes first, then namespaces.
struct World {
    _servers: Vec<Proc>,
    backends: Vec<(Ns, String)>,
    client: Ns,
    external: Ns,
    node: Ns,
    _www: tempfile::TempDir,
    nft: NftNetlink,
}

impl World {
    fn build(backends: usize) -> World {
        sweep_stale();
        let www = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}-{}-www", std::process::id()))
            .tempdir()
            .unwrap();
        let node = Ns::create("node");
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "br0"]);
        node.ip(&["link", "set", "br0", "up"]);
        node.sysctl("net.ipv4.ip_forward=1");
        // Pod-to-pod replies leave through the interface they came in on; a redirect would
        // teach pods to bypass the node (and its conntrack).
        node.sysctl("net.ipv4.conf.all.send_redirects=0");
        node.sysctl("net.ipv4.conf.br0.send_redirects=0");
        node.sysctl("net.ipv6.conf.all.forwarding=1");
        node.ip(&["addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"]);
        // With br_netfilter loaded, bridged frames would also meet the proxy's hooks and a
        // DNATed hairpin packet would be bridged back out of its ingress port (and dropped).
        // The node routes, it does not bridge-filter: switch that off here, where present.
        for knob in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
            if Path::new(&format!("/proc/sys/net/bridge/{knob}")).exists() {
                node.sysctl(&format!("net.bridge.{knob}=0"));
            }
        }

        let external = Ns::create("ext");
        node.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &external.name,
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("{NODE_EXTERNAL_IP}/24"),
            "dev",
            "eth0",
        ]);
        node.ip(&["link", "set", "eth0", "up"]);
        // Traffic to ClusterIPs that nothing DNATs needs a route to reach the forward hook.
        node.ip(&["route", "add", "default", "via", EXTERNAL_IP]);
        node.ip(&["addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad"]);
        node.ip(&["-6", "route", "add", "default", "via", "fd00:77::2"]);
        external.ip(&["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"]);
        external.ip(&["addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"]);
        external.ip(&["link", "set", "eth0", "up"]);

        let pod = |role: &str, index: usize, ip: &str| -> Ns {
            let ns = Ns::create(role);
            let host_end = format!("v{role}{index}");
            node.ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            node.ip(&["link", "set", &host_end, "master", "br0", "up"]);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "10.244.0.1", "dev", "eth0", "scope", "link"]);
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                "10.244.0.1",
                "dev",
                "eth0",
            ]);
            // The node forwards pod-to-pod traffic out of the interface it came in on; a
            // redirect accepted here would send replies around the node's conntrack. (The
            // interface's own knob: for a host, IPv4 ORs it with `all`, IPv6 reads it alone.)
            ns.sysctl("net.ipv4.conf.eth0.accept_redirects=0");
            ns.sysctl("net.ipv6.conf.eth0.accept_redirects=0");
            // The same over IPv6: a /128 and the node as the only router.
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/128", v6_of(ip)),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["-6", "route", "add", "fd00:244::1", "dev", "eth0"]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:244::1",
                "dev",
                "eth0",
            ]);
            ns
        };
        let client = pod("c", 0, "10.244.0.20");
        let mut servers = Vec::new();
        let mut list = Vec::new();
        for i in 0..backends {
            let ip = format!("10.244.0.{}", 11 + i);
            let ns = pod("b", i, &ip);
            let dir = www.path().join(format!("b{i}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("index.html"), format!("backend-{i}\n")).unwrap();
            // /cgi-bin/ip answers with the backend's name and the client address it sees.
            let cgi = dir.join("cgi-bin");
            std::fs::create_dir(&cgi).unwrap();
            let script = cgi.join("ip");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"backend-{i} $REMOTE_ADDR\"\n"
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let child = ns
                .command("/bin/busybox")
                .args(["httpd", "-f", "-p", "80", "-h"])
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            servers.push(Proc(child));
            list.push((ns, ip));
        }
        let nft = NftNetlink::in_netns(node.path()).with_list_program("/usr/sbin/nft");
        let world = World {
            _servers: servers,
            backends: list,
            client,
            external,
            node,
            _www: www,
            nft,
        };
        for (_, ip) in &world.backends {
            world.wait_serving(&world.client, ip);
        }
        world
    }

    fn wait_serving(&self, from: &Ns, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match http_get(from, addr, 80) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!("{addr} not serving: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn config(&self) -> Config {
        Config {
            node_name: NODE_NAME.into(),
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/64".parse().unwrap(),
            ],
            masquerade_all: false,
            nodeport_addresses: Default::default(),
        }
    }

    fn sync(&self, syncer: &mut Applied, services: &[Service], slices: &[EndpointSlice]) {
        let (model, warnings) = model::build(services, slices, None, &self.config());
        assert!(warnings.is_empty(), "{warnings:?}");
        let ruleset = Ruleset::build(&model, &self.config());
        syncer.sync(&self.nft, ruleset).unwrap();
    }
}

/// A pod's IPv6 address: `fd00:244::` followed by the last octet of its IPv4 address.
fn v6_of(v4: &str) -> String {
    format!("fd00:244::{}", v4.rsplit('.').next().unwrap_or_default())
}

/// An HTTP GET with `busybox nc` from inside `ns`: the body, or the error nc printed.
/// (`busybox wget` from Debian's busybox-static 1.35 segfaults before connecting, even on
/// loopback, so the request is written by hand.)
fn http_get(ns: &Ns, addr: &str, port: u16) -> Result<String, String> {
    http_get_path(ns, addr, port, "/")
}

/// Like [`http_get`], for `path`.
fn http_get_path(ns: &Ns, addr: &str, port: u16, path: &str) -> Result<String, String> {
    let mut child = ns
        .command("/bin/busybox")
        .args(["nc", "-w", "2", addr, &port.to_string()])
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
        Some((head, body)) if out.status.success() && head.starts_with("HTTP/1.") => {
            // httpd listens on a dual-stack socket: IPv4 clients show as [::ffff:a.b.c.d].
            Ok(body.trim().replace("[::ffff:", "").replace(']', ""))
        }
        _ => Err(format!(
            "{}{}",
            text,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn web_service(node_port: bool) -> Service {
    let mut spec = json!({
        "clusterIP": CLUSTER_IP,
        "clusterIPs": [CLUSTER_IP],
        "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }],
    });
    if node_port {
        spec["type"] = json!("NodePort");
        spec["ports"][0]["nodePort"] = json!(NODE_PORT);
    }
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": "web" },
        "spec": spec,
    }))
    .unwrap()
}

fn web_slice(ips: &[&str]) -> EndpointSlice {
    let on_b: Vec<(&str, &str)> = ips.iter().map(|ip| (*ip, "node-b")).collect();
    web_slice_on(&on_b)
}

/// The `web` slice with endpoints `(ip, nodeName)`.
fn web_slice_on(endpoints: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({ "addresses": [ip], "nodeName": node, "conditions": { "ready": true } }))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "default",
            "name": "web-abcde",
            "labels": { "kubernetes.io/service-name": "web" },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// Fetches `http://addr:port/` `tries` times and counts the answers by body.
fn spread(from: &Ns, addr: &str, port: u16, tries: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..tries {
        let body = http_get(from, addr, port).unwrap_or_else(|e| panic!("{addr}:{port}: {e}"));
        *seen.entry(body).or_insert(0) += 1;
    }
    seen
}

#[test]
fn cluster_ip_spreads_over_endpoints_rejects_when_empty_and_recovers() {
    let world = World::build(3);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    let svc = web_service(false);
    let mut syncer = Applied::default();

    world.sync(&mut syncer, std::slice::from_ref(&svc), &[web_slice(&ips)]);
    let seen = spread(&world.client, CLUSTER_IP, 80, 30);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1", "backend-2"],
        "{seen:?}"
    );

    // Scaled to zero: rejected at once (TCP reset), not left to time out.
    world.sync(&mut syncer, std::slice::from_ref(&svc), &[web_slice(&[])]);
    let started = Instant::now();
    let err = http_get(&world.client, CLUSTER_IP, 80).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // An unused port of the ClusterIP is rejected too.
    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice(&ips[..1])],
    );
    let err = http_get(&world.client, CLUSTER_IP, 81).unwrap_err();
    assert!(err.contains("refused"), "{err}");

    // Back up with two endpoints: served by exactly those.
    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice(&ips[1..])],
    );
    let seen = spread(&world.client, CLUSTER_IP, 80, 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "{seen:?}"
    );
}

#[test]
fn node_port_serves_external_clients() {
    let world = World::build(2);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    let mut syncer = Applied::default();
    world.sync(&mut syncer, &[web_service(true)], &[web_slice(&ips)]);
    // The external host has no route to pods: replies only come back because the node
    // masqueraded the connection.
    let seen = spread(&world.external, NODE_EXTERNAL_IP, NODE_PORT, 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );
    // And without endpoints the NodePort rejects.
    world.sync(&mut syncer, &[web_service(true)], &[web_slice(&[])]);
    let err = http_get(&world.external, NODE_EXTERNAL_IP, NODE_PORT).unwrap_err();
    assert!(err.contains("refused"), "{err}");
}

#[test]
fn load_balancer_ip_serves_external_clients_within_its_source_ranges() {
    let world = World::build(2);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    const LB_IP: &str = "203.0.113.10";
    // The load balancer (here: a route on the external host) sends its IP to the node.
    world
        .external
        .ip(&["route", "add", LB_IP, "via", NODE_EXTERNAL_IP]);
    let lb_service = |ranges: &[&str]| {
        let mut svc = web_service(true);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.load_balancer_source_ranges = Some(ranges.iter().map(|r| r.to_string()).collect());
        svc.status = Some(
            serde_json::from_value(json!({ "loadBalancer": { "ingress": [{ "ip": LB_IP }] } }))
                .unwrap(),
        );
        svc
    };
    let mut syncer = Applied::default();
    world.sync(&mut syncer, &[lb_service(&[])], &[web_slice(&ips)]);
    let seen = spread(&world.external, LB_IP, 80, 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );
    // Source ranges that leave the external host out: its connections are dropped.
    world.sync(
        &mut syncer,
        &[lb_service(&["198.51.100.0/24"])],
        &[web_slice(&ips)],
    );
    let err = http_get(&world.external, LB_IP, 80).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    // ...and ranges that hold it: served again.
    world.sync(
        &mut syncer,
        &[lb_service(&[
            "198.51.100.0/24",
            &format!("{EXTERNAL_IP}/32"),
        ])],
        &[web_slice(&ips)],
    );
    assert!(
        http_get(&world.external, LB_IP, 80)
            .unwrap()
            .starts_with("backend-")
    );
}

#[test]
fn nodeport_addresses_limit_the_local_addresses_that_accept_node_ports() {
    let world = World::build(1);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    let node_port_on = |config: &Config, addr: &str| {
        let (model, _) = model::build(&[web_service(true)], &[web_slice(&ips)], None, config);
        Applied::default()
            .sync(&world.nft, Ruleset::build(&model, config))
            .unwrap();
        http_get(&world.node, addr, NODE_PORT)
    };
    // Every local address by default (`all`): the external and the bridge address.
    let all = world.config();
    assert_eq!(node_port_on(&all, NODE_EXTERNAL_IP).unwrap(), "backend-0");
    assert_eq!(node_port_on(&all, "10.244.0.1").unwrap(), "backend-0");
    // Only the node's addresses in 192.168.77.0/24.
    let mut only = world.config();
    only.nodeport_addresses = NodePortAddresses::Only {
        cidrs: vec!["192.168.77.0/24".parse().unwrap()],
        primary: false,
    };
    assert_eq!(node_port_on(&only, NODE_EXTERNAL_IP).unwrap(), "backend-0");
    let err = node_port_on(&only, "10.244.0.1").unwrap_err();
    assert!(err.contains("refused"), "{err}");
    assert_eq!(
        http_get(&world.external, NODE_EXTERNAL_IP, NODE_PORT).unwrap(),
        "backend-0"
    );
}

#[test]
fn hairpin_connection_lands_on_the_caller_and_gets_the_reply() {
    let world = World::build(2);
    let (own_ns, own_ip) = &world.backends[0];
    let mut syncer = Applied::default();
    // The backend runs on this node (hairpin traffic only ever comes from a local pod).
    world.sync(
        &mut syncer,
        &[web_service(false)],
        &[web_slice_on(&[(own_ip, NODE_NAME)])],
    );
    // Masqueraded to the node's bridge address, or the reply would bypass the DNAT.
    let body = http_get_path(own_ns, CLUSTER_IP, 80, "/cgi-bin/ip").unwrap();
    assert_eq!(body, "backend-0 10.244.0.1");
    // A pod's ClusterIP traffic keeps its source otherwise.
    let body = http_get_path(&world.client, CLUSTER_IP, 80, "/cgi-bin/ip").unwrap();
    assert_eq!(body, "backend-0 10.244.0.20");
}

#[test]
fn session_affinity_sticks_and_expires() {
    let world = World::build(3);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    let mut svc = web_service(false);
    let spec = svc.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config =
        Some(serde_json::from_value(json!({ "clientIP": { "timeoutSeconds": 2 } })).unwrap());
    let mut syncer = Applied::default();
    world.sync(&mut syncer, std::slice::from_ref(&svc), &[web_slice(&ips)]);
    let seen = spread(&world.client, CLUSTER_IP, 80, 15);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let first = seen.keys().next().cloned().unwrap();
    // Once the timeout passes without traffic, the pick is random again: within a few
    // rounds another backend answers (all 8 alike by chance: (1/3)^8).
    let mut others = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2500));
        let body = http_get(&world.client, CLUSTER_IP, 80).unwrap();
        if body != first {
            others.push(body);
            break;
        }
    }
    assert!(!others.is_empty(), "always {first}");
}

#[test]
fn external_traffic_policy_local_keeps_source_and_drops_without_local_endpoint() {
    let world = World::build(2);
    let (ip0, ip1) = (world.backends[0].1.as_str(), world.backends[1].1.as_str());
    let mut svc = web_service(true);
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let mut syncer = Applied::default();
    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice_on(&[(ip0, NODE_NAME), (ip1, "node-b")])],
    );
    for _ in 0..10 {
        let body =
            http_get_path(&world.external, NODE_EXTERNAL_IP, NODE_PORT, "/cgi-bin/ip").unwrap();
        assert_eq!(body, format!("backend-0 {EXTERNAL_IP}"));
    }
    // Only a remote endpoint left: external traffic is dropped (no reset: the client times
    // out), while ClusterIP traffic still reaches the remote endpoint.
    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice_on(&[(ip1, "node-b")])],
    );
    let started = Instant::now();
    let err = http_get(&world.external, NODE_EXTERNAL_IP, NODE_PORT).unwrap_err();
    assert!(!err.contains("refused"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{err}");
    assert_eq!(
        http_get(&world.client, CLUSTER_IP, 80).unwrap(),
        "backend-1"
    );
}

#[test]
fn ipv6_cluster_ip_spreads_rejects_when_empty_and_recovers() {
    let world = World::build(2);
    let v6: Vec<String> = world.backends.iter().map(|(_, ip)| v6_of(ip)).collect();
    let v4: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    for ip in &v6 {
        world.wait_serving(&world.client, ip);
    }
    let cluster_ip6 = "fd00:96::10";
    let mut svc = web_service(false);
    svc.spec.as_mut().unwrap().cluster_ips = Some(vec![CLUSTER_IP.into(), cluster_ip6.into()]);
    let slice6 = |ips: &[String]| {
        let mut s = web_slice(&ips.iter().map(String::as_str).collect::<Vec<_>>());
        s.address_type = "IPv6".into();
        s.metadata.name = Some("web-v6".into());
        s
    };
    let mut syncer = Applied::default();
    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice(&v4), slice6(&v6)],
    );
    let seen = spread(&world.client, cluster_ip6, 80, 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );
    // The client's own IPv6 address arrives unchanged (it is inside the cluster CIDR).
    let body = http_get_path(&world.client, cluster_ip6, 80, "/cgi-bin/ip").unwrap();
    assert!(body.ends_with(&v6_of("10.244.0.20")), "{body}");

    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice(&v4), slice6(&[])],
    );
    let err = http_get(&world.client, cluster_ip6, 80).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    // IPv4 is untouched by the IPv6 change.
    assert!(http_get(&world.client, CLUSTER_IP, 80).is_ok());

    world.sync(
        &mut syncer,
        std::slice::from_ref(&svc),
        &[web_slice(&v4), slice6(&v6[1..])],
    );
    assert_eq!(
        http_get(&world.client, cluster_ip6, 80).unwrap(),
        "backend-1"
    );
}

/// Lists a table as JSON with handles dropped and unordered parts sorted, so that two
/// tables built along different paths compare equal when they hold the same rules.
fn normalized(ns: &Ns, family: IpFamily) -> Vec<String> {
    let family = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let out = run(ns
        .command("/usr/sbin/nft")
        .args(["-j", "list", "table", family, TABLE]));
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("handle");
                for (k, inner) in map.iter_mut() {
                    strip(inner);
                    if k == "elem"
                        && let Value::Array(items) = inner
                    {
                        items.sort_by_key(|i| i.to_string());
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut items: Vec<Value> = value["nftables"].as_array().cloned().unwrap_or_default();
    items.iter_mut().for_each(strip);
    let mut lines: Vec<String> = items
        .iter()
        .filter(|i| i.get("metainfo").is_none())
        .map(|i| i.to_string())
        .collect();
    lines.sort();
    lines
}

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(
        json!({ "metadata": { "namespace": "default", "name": name }, "spec": spec }),
    )
    .unwrap()
}

fn slice(svc: &str, family: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({ "addresses": [ip], "nodeName": node }))
        .collect();
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": format!("{svc}-{family}"), "labels": { "kubernetes.io/service-name": svc } },
        "addressType": family,
        "ports": [{ "port": 8080 }],
        "endpoints": eps,
    }))
    .unwrap()
}

#[test]
fn partial_syncs_reach_the_same_tables_as_a_full_sync() {
    sweep_stale();
    let node = Ns::create("sync");
    let nft = NftNetlink::in_netns(node.path()).with_list_program("/usr/sbin/nft");
    let config = Config {
        node_name: NODE_NAME.into(),
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    };
    let services = || {
        vec![
            service(
                "plain",
                json!({ "clusterIP": "10.96.0.1", "ports": [{ "port": 80 }] }),
            ),
            service(
                "sticky",
                json!({ "clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 30 } }, "ports": [{ "port": 80 }] }),
            ),
            service(
                "np-local",
                json!({ "type": "NodePort", "clusterIP": "10.96.0.3", "externalTrafficPolicy": "Local", "externalIPs": ["192.0.2.3"], "ports": [{ "port": 80, "nodePort": 30003 }] }),
            ),
            // Crosses the endpoint count at which a named map replaces the rule ladder, both ways.
            service(
                "shrink",
                json!({ "clusterIP": "10.96.0.5", "ports": [{ "port": 80 }] }),
            ),
            service(
                "grow",
                json!({ "clusterIP": "10.96.0.6", "ports": [{ "port": 80 }] }),
            ),
            service(
                "dual",
                json!({ "clusterIPs": ["10.96.0.4", "fd00:96::4"], "ports": [{ "port": 53, "protocol": "UDP" }, { "name": "sctp", "port": 9, "protocol": "SCTP" }] }),
            ),
        ]
    };
    let many = |prefix: &str, n: usize| -> Vec<(String, &'static str)> {
        (1..=n).map(|i| (format!("{prefix}.{i}"), "n1")).collect()
    };
    let (shrink_a, shrink_b) = (many("10.244.5", 20), many("10.244.5", 3));
    let (grow_a, grow_b) = (many("10.244.6", 2), many("10.244.6", 20));
    let owned = |svc: &str, v: &[(String, &'static str)]| {
        let borrowed: Vec<(&str, &str)> = v.iter().map(|(ip, n)| (ip.as_str(), *n)).collect();
        slice(svc, "IPv4", &borrowed)
    };
    let state_a = vec![
        owned("shrink", &shrink_a),
        owned("grow", &grow_a),
        slice(
            "plain",
            "IPv4",
            &[("10.244.1.1", "n1"), ("10.244.1.2", "n2")],
        ),
        slice("sticky", "IPv4", &[("10.244.2.1", "n1")]),
        slice(
            "np-local",
            "IPv4",
            &[("10.244.3.1", NODE_NAME), ("10.244.3.2", "n2")],
        ),
        slice("dual", "IPv4", &[("10.244.4.1", "n1")]),
        slice("dual", "IPv6", &[("fd00:244::4:1", "n1")]),
    ];
    let state_b = vec![
        owned("shrink", &shrink_b),
        owned("grow", &grow_b),
        slice(
            "plain",
            "IPv4",
            &[("10.244.1.2", "n2"), ("10.244.1.3", "n3")],
        ),
        slice(
            "sticky",
            "IPv4",
            &[("10.244.2.1", "n1"), ("10.244.2.2", "n2")],
        ),
        slice("np-local", "IPv4", &[("10.244.3.2", "n2")]),
        slice(
            "dual",
            "IPv6",
            &[("fd00:244::4:1", "n1"), ("fd00:244::4:2", "n1")],
        ),
    ];
    let build = |svcs: &[Service], slices: &[EndpointSlice]| {
        let (model, warnings) = model::build(svcs, slices, None, &config);
        assert!(warnings.is_empty(), "{warnings:?}");
        Ruleset::build(&model, &config)
    };

    let mut syncer = Applied::default();
    let a = build(&services(), &state_a);
    let b = build(&services()[..5], &state_b);
    assert!(syncer.sync(&nft, a.clone()).unwrap().full);
    let to_b = syncer.sync(&nft, b.clone()).unwrap();
    assert!(!to_b.full);
    let back_to_a = syncer.sync(&nft, a.clone()).unwrap();
    assert!(!back_to_a.full);
    let to_b_again = syncer.sync(&nft, b.clone()).unwrap();
    assert!(!to_b_again.full);
    let partial = [
        normalized(&node, IpFamily::V4),
        normalized(&node, IpFamily::V6),
    ];

    let mut fresh = Applied::default();
    assert!(fresh.sync(&nft, b).unwrap().full);
    let full = [
        normalized(&node, IpFamily::V4),
        normalized(&node, IpFamily::V6),
    ];
    assert_eq!(partial, full);

    // The daemon's incremental pipeline (claims per service port, deltas of the touched
    // objects) reaches the same tables too.
    // The objects as the daemon's watches keep them.
    let mut interner = strake_proxy::model::Interner::default();
    let mut arcs = |v: Vec<EndpointSlice>| {
        v.iter()
            .map(|s| Arc::new(strake_proxy::model::SliceObject::new(s, &mut interner)))
            .collect::<Vec<_>>()
    };
    let svc_a: Vec<Arc<strake_proxy::model::ServiceObject>> = services()
        .iter()
        .map(|s| Arc::new(strake_proxy::model::ServiceObject::new(s)))
        .collect();
    let svc_b = svc_a[..5].to_vec();
    let (sl_a, sl_b) = (arcs(state_a.clone()), arcs(state_b.clone()));
    let mut programmer = Programmer::new(&config);
    assert!(programmer.sync(&nft, &svc_a, &sl_a, None).unwrap().full);
    for (svcs, slices) in [(&svc_b, &sl_b), (&svc_a, &sl_a), (&svc_b, &sl_b)] {
        assert!(!programmer.sync(&nft, svcs, slices, None).unwrap().full);
    }
    let incremental = [
        normalized(&node, IpFamily::V4),
        normalized(&node, IpFamily::V6),
    ];
    assert_eq!(incremental, full);
    // Sanity: the listing holds what we think it holds.
    let listing = nft.list_table(IpFamily::V4, TABLE).unwrap();
    // Plain services are map elements behind shared chains; affinity keeps per-endpoint ones.
    assert!(listing.contains(": 10.244.1.3 . 8080"), "{listing}");
    assert!(!listing.contains("10.244.1.1"), "{listing}");
    assert!(listing.contains("chain cluster-20 {"), "{listing}");
    assert!(listing.contains("chain cluster-3 {"), "{listing}");
    assert!(!listing.contains("10.244.5.4 "), "{listing}");
    assert!(
        listing.contains("chain ep-default/sticky/tcp/80__10.244.2.2/8080 {"),
        "{listing}"
    );
}

/// What the UDP client prints before the reply it got.
const UDP_REPLY: &str = "udp-reply:";

/// The UDP helper binary (`tests/helpers/udp.rs`) run as `spec` (`serve NAME PORT` or
/// `send SRC DST`) inside `ns`.
fn udp_helper_command(ns: &Ns, spec: &str) -> Command {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_strake-proxy-test-udp"));
    cmd.args(spec.split_whitespace()).stdin(Stdio::null());
    cmd
}

/// One datagram from the client pod's fixed source port to `dst`: the reply's body.
fn udp_send(client: &Ns, dst: &str) -> String {
    udp_send_from(client, "10.244.0.20:40053", dst)
}

/// One datagram from `src` (in the client pod) to `dst`: the reply's body, or `error ...`.
fn udp_send_from(client: &Ns, src: &str, dst: &str) -> String {
    let out = udp_helper_command(client, &format!("send {src} {dst}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once(UDP_REPLY).map(|(_, reply)| reply))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "no reply line: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn dns_service() -> Service {
    service(
        "dns",
        json!({ "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP], "ports": [{ "name": "dns", "port": 53, "protocol": "UDP" }] }),
    )
}

fn dns_slice(ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({ "addresses": [ip], "nodeName": "node-b", "conditions": { "ready": true } }))
        .collect();
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": "dns-1", "labels": { "kubernetes.io/service-name": "dns" } },
        "addressType": "IPv4",
        "ports": [{ "name": "dns", "port": 5353, "protocol": "UDP" }],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// The UDP servers `backend-<i>` on port 5353 of each backend, stopped on drop.
fn udp_servers(world: &World) -> Vec<Proc> {
    world
        .backends
        .iter()
        .enumerate()
        .map(|(i, (ns, _))| {
            let cmd = udp_helper_command(ns, &format!("serve backend-{i} 5353"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Proc(cmd)
        })
        .collect()
}

#[test]
fn udp_cluster_ip_spreads_rejects_when_empty_and_recovers() {
    let world = World::build(2);
    let ips: Vec<&str> = world.backends.iter().map(|(_, ip)| ip.as_str()).collect();
    // Declared after the world: stopped before its namespaces go.
    let _udp_servers = udp_servers(&world);
    let svc = dns_service();
    let sync = |syncer: &mut Applied, ips: &[&str]| {
        let (model, warnings) = model::build(
            std::slice::from_ref(&svc),
            &[dns_slice(ips)],
            None,
            &world.config(),
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        syncer
            .sync(&world.nft, Ruleset::build(&model, &world.config()))
            .unwrap();
    };
    let dst = format!("{CLUSTER_IP}:53");
    let mut syncer = Applied::default();
    sync(&mut syncer, &ips);
    // The servers may still be starting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !udp_send_from(&world.client, "10.244.0.20:40999", &dst).starts_with("backend-") {
        assert!(Instant::now() < deadline, "no UDP backend answers");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each source port is a flow of its own: flows spread over both endpoints.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for port in 41000..41024 {
        let reply = udp_send_from(&world.client, &format!("10.244.0.20:{port}"), &dst);
        *seen.entry(reply).or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );

    // No endpoints: an ICMP error at once, not silence.
    sync(&mut syncer, &[]);
    let reply = udp_send_from(&world.client, "10.244.0.20:42000", &dst);
    assert!(
        reply.starts_with("error") && reply.contains("No route to host"),
        "{reply}"
    );

    // One endpoint again: served by it.
    sync(&mut syncer, &ips[1..]);
    for port in 42001..42005 {
        let reply = udp_send_from(&world.client, &format!("10.244.0.20:{port}"), &dst);
        assert_eq!(reply, "backend-1");
    }
}

#[test]
fn udp_flow_to_a_removed_endpoint_is_deleted_and_the_next_datagram_reaches_a_live_one() {
    let world = World::build(2);
    let (ip0, ip1) = (world.backends[0].1.as_str(), world.backends[1].1.as_str());
    // Declared after the world: stopped before its namespaces go.
    let _udp_servers = udp_servers(&world);
    let svc = dns_service();
    let model_with = |ips: &[&str]| {
        let (model, warnings) = model::build(
            std::slice::from_ref(&svc),
            &[dns_slice(ips)],
            None,
            &world.config(),
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        model
    };
    let dst = format!("{CLUSTER_IP}:53");
    let mut syncer = Applied::default();
    let before = model_with(&[ip0]);
    syncer
        .sync(&world.nft, Ruleset::build(&before, &world.config()))
        .unwrap();
    // The servers may still be starting.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reply = udp_send(&world.client, &dst);
    while reply != "backend-0" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        reply = udp_send(&world.client, &dst);
    }
    assert_eq!(reply, "backend-0");

    // backend-0 leaves the service: the rules change, but the flow's conntrack entry still
    // DNATs the client's datagrams to it.
    let after = model_with(&[ip1]);
    syncer
        .sync(&world.nft, Ruleset::build(&after, &world.config()))
        .unwrap();
    assert_eq!(udp_send(&world.client, &dst), "backend-0", "stale flow");

    let deletions = conntrack::stale(&UdpState::of(&before), &UdpState::of(&after));
    assert_eq!(
        deletions,
        [Deletion::ReplyFrom {
            ip: ip0.parse().unwrap(),
            port: 5353
        }]
    );
    let ct = ConntrackCommand::in_netns(world.node.path()).with_program("/usr/sbin/conntrack");
    assert_eq!(conntrack::clean(&ct, &deletions), 0);
    // Deleting again finds nothing, which is not an error.
    assert_eq!(conntrack::clean(&ct, &deletions), 0);
    for _ in 0..5 {
        assert_eq!(udp_send(&world.client, &dst), "backend-1");
    }
    // Nothing of the flow to backend-0 is left in the node's table.
    let listing = run(world
        .node
        .command("/usr/sbin/conntrack")
        .args(["-L", "-p", "udp"]));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(!listing.contains(&format!("src={ip0} ")), "{listing}");
    assert!(listing.contains(&format!("src={ip1} ")), "{listing}");
}

#[test]
fn udp_flow_cached_before_the_service_had_endpoints_is_deleted_when_it_gets_one() {
    let world = World::build(1);
    let ip0 = world.backends[0].1.as_str();
    let _udp_server = udp_servers(&world);
    let dst = format!("{CLUSTER_IP}:53");
    // The proxy's tables are in place (with their NAT hooks), but there is no Service yet:
    // nothing rewrites the datagram, the node routes it out to the external host (nothing
    // listens there) and conntrack remembers the flow as one without NAT. (Without any NAT
    // hook at that moment the kernel would bind NAT on the next packet instead.)
    let mut syncer = Applied::default();
    world.sync(&mut syncer, &[], &[]);
    let reply = udp_send(&world.client, &dst);
    assert!(reply.starts_with("error"), "{reply}");

    let svc = dns_service();
    let (model, warnings) = model::build(
        std::slice::from_ref(&svc),
        &[dns_slice(&[ip0])],
        None,
        &world.config(),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    syncer
        .sync(&world.nft, Ruleset::build(&model, &world.config()))
        .unwrap();
    // The rules are in, but the remembered flow bypasses them.
    let reply = udp_send(&world.client, &dst);
    assert!(reply.starts_with("error"), "stale flow: {reply}");

    let deletions = conntrack::stale(&UdpState::default(), &UdpState::of(&model));
    assert_eq!(
        deletions,
        [Deletion::To {
            ip: CLUSTER_IP.parse().unwrap(),
            port: 53
        }]
    );
    let ct = ConntrackCommand::in_netns(world.node.path()).with_program("/usr/sbin/conntrack");
    assert_eq!(conntrack::clean(&ct, &deletions), 0);
    // The server may still be starting.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reply = udp_send(&world.client, &dst);
    while reply != "backend-0" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        reply = udp_send(&world.client, &dst);
    }
    assert_eq!(reply, "backend-0");
}
