//! The netlink backend against the real kernel, in network namespaces these tests create
//! (needs root): it must build the same tables as `nft -f` does from the same transactions
//! (rendered as scripts for it), keep the previous ruleset when the kernel refuses a batch,
//! and touch only its own tables.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use strake_integration::netns::NetNs;
use strake_proxy::config::Config;
use strake_proxy::model::{self, IpFamily};
use strake_proxy::nft::netlink::NftNetlink;
use strake_proxy::nft::objects::{Rule, Stmt, Verdict};
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::transaction::{Command, SyncError, Transaction};

mod common;
use common::Applied;
use strake_proxy::nft::{Nft, NftCommand, NftError, TABLE};

const NFT: &str = "/usr/sbin/nft";

fn config() -> Config {
    Config {
        node_name: "node-a".into(),
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    }
}

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(
        json!({ "metadata": { "namespace": "default", "name": name }, "spec": spec }),
    )
    .unwrap()
}

fn with_lb(mut svc: Service, ip: &str) -> Service {
    svc.status = Some(
        serde_json::from_value(json!({ "loadBalancer": { "ingress": [{ "ip": ip }] } })).unwrap(),
    );
    svc
}

fn slice(svc: &str, family: &str, endpoints: &[(String, &str)]) -> EndpointSlice {
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

fn eps(
    prefix: &str,
    range: std::ops::RangeInclusive<usize>,
    node: &'static str,
) -> Vec<(String, &'static str)> {
    range.map(|i| (format!("{prefix}{i}"), node)).collect()
}

/// Every kind of object the ruleset builder writes: rule ladders and named endpoint maps,
/// affinity sets with timeouts, NodePorts and external IPs with both traffic policies,
/// LoadBalancer source ranges (interval sets), services without endpoints, IPv6 and SCTP.
fn services() -> Vec<Service> {
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
        service(
            "shrink",
            json!({ "clusterIP": "10.96.0.5", "ports": [{ "port": 80 }] }),
        ),
        service(
            "grow",
            json!({ "clusterIP": "10.96.0.6", "ports": [{ "port": 80 }] }),
        ),
        with_lb(
            service(
                "lb",
                json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.7", "loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/12"], "ports": [{ "port": 443, "nodePort": 30443 }] }),
            ),
            "198.51.100.1",
        ),
        with_lb(
            service(
                "lb-any",
                json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.10", "loadBalancerSourceRanges": ["0.0.0.0/0"], "ports": [{ "port": 443, "nodePort": 30445 }] }),
            ),
            "198.51.100.2",
        ),
        service(
            "empty",
            json!({ "clusterIP": "10.96.0.8", "ports": [{ "port": 81 }] }),
        ),
        service(
            "dual",
            json!({ "clusterIPs": ["10.96.0.4", "fd00:96::4"], "ipFamilies": ["IPv4", "IPv6"], "ports": [{ "port": 53, "protocol": "UDP" }, { "name": "sctp", "port": 9, "protocol": "SCTP" }] }),
        ),
        with_lb(
            service(
                "lb6",
                json!({ "type": "LoadBalancer", "clusterIPs": ["fd00:96::9"], "ipFamilies": ["IPv6"], "loadBalancerSourceRanges": ["2001:db8::/32", "2001:db9::/61"], "ports": [{ "port": 443, "nodePort": 30444 }] }),
            ),
            "2001:db8::1",
        ),
    ]
}

fn state_a() -> Vec<EndpointSlice> {
    vec![
        slice("shrink", "IPv4", &eps("10.244.5.", 1..=20, "n1")),
        slice("grow", "IPv4", &eps("10.244.6.", 1..=2, "n1")),
        slice(
            "plain",
            "IPv4",
            &[("10.244.1.1".into(), "n1"), ("10.244.1.2".into(), "n2")],
        ),
        slice("sticky", "IPv4", &[("10.244.2.1".into(), "n1")]),
        slice(
            "np-local",
            "IPv4",
            &[("10.244.3.1".into(), "node-a"), ("10.244.3.2".into(), "n2")],
        ),
        slice("lb", "IPv4", &[("10.244.7.1".into(), "n1")]),
        slice("lb-any", "IPv4", &[("10.244.7.2".into(), "n1")]),
        slice("dual", "IPv4", &[("10.244.4.1".into(), "n1")]),
        slice("dual", "IPv6", &[("fd00:244::4:1".into(), "n1")]),
        slice("lb6", "IPv6", &eps("fd00:244::9:", 1..=18, "n1")),
    ]
}

fn state_b() -> Vec<EndpointSlice> {
    vec![
        slice("shrink", "IPv4", &eps("10.244.5.", 1..=3, "n1")),
        slice("grow", "IPv4", &eps("10.244.6.", 1..=20, "n1")),
        slice(
            "plain",
            "IPv4",
            &[("10.244.1.2".into(), "n2"), ("10.244.1.3".into(), "n3")],
        ),
        slice(
            "sticky",
            "IPv4",
            &[("10.244.2.1".into(), "n1"), ("10.244.2.2".into(), "n2")],
        ),
        slice("np-local", "IPv4", &[("10.244.3.2".into(), "n2")]),
        slice(
            "dual",
            "IPv6",
            &[
                ("fd00:244::4:1".into(), "n1"),
                ("fd00:244::4:2".into(), "n1"),
            ],
        ),
        slice("empty", "IPv4", &[("10.244.8.1".into(), "n1")]),
        slice("lb6", "IPv6", &eps("fd00:244::9:", 1..=2, "n1")),
    ]
}

fn build(svcs: &[Service], slices: &[EndpointSlice]) -> Ruleset {
    let (model, warnings) = model::build(svcs, slices, None, &config());
    assert!(warnings.is_empty(), "{warnings:?}");
    Ruleset::build(&model, &config())
}

fn a() -> Ruleset {
    build(&services(), &state_a())
}

fn b() -> Ruleset {
    // One Service fewer, different endpoints everywhere, and one prefix of an interval set
    // replaced by another (element deletion from an interval set).
    let mut svcs = services();
    svcs.retain(|s| s.metadata.name.as_deref() != Some("lb"));
    for svc in &mut svcs {
        if svc.metadata.name.as_deref() == Some("lb6")
            && let Some(spec) = svc.spec.as_mut()
        {
            spec.load_balancer_source_ranges =
                Some(vec!["2001:db8::/32".into(), "2001:dba::/48".into()]);
        }
    }
    build(&svcs, &state_b())
}

/// Both tables as `nft -j list` JSON objects, handles dropped and unordered parts sorted (a
/// hash set lists its elements in an order of its own).
fn normalized(ns: &NetNs) -> Vec<String> {
    let mut lines = Vec::new();
    for family in ["ip", "ip6"] {
        let out = ns
            .run(NFT, &["-j", "list", "table", family, TABLE])
            .unwrap();
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
        lines.extend(
            items
                .iter()
                .filter(|i| i.get("metainfo").is_none())
                .map(|i| i.to_string()),
        );
    }
    lines.sort();
    lines
}

/// The text listing with the lines of each element block sorted: what a person reads.
fn listing(nft: &dyn Nft) -> String {
    let mut out = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        out.push_str(&nft.list_table(family, TABLE).unwrap());
    }
    out
}

struct Pair {
    text_ns: NetNs,
    netlink_ns: NetNs,
    text: NftCommand,
    netlink: NftNetlink,
}

impl Pair {
    fn new() -> Pair {
        let text_ns = NetNs::create("nlt").unwrap();
        let netlink_ns = NetNs::create("nln").unwrap();
        let text = NftCommand::in_netns(text_ns.path()).with_program(NFT);
        let netlink = NftNetlink::in_netns(netlink_ns.path()).with_list_program(NFT);
        Pair {
            text_ns,
            netlink_ns,
            text,
            netlink,
        }
    }

    fn assert_same(&self, what: &str) {
        let (t, n) = (normalized(&self.text_ns), normalized(&self.netlink_ns));
        if t != n {
            let only_t: Vec<&String> = t.iter().filter(|l| !n.contains(l)).collect();
            let only_n: Vec<&String> = n.iter().filter(|l| !t.contains(l)).collect();
            panic!(
                "{what}: tables differ\nonly via nft -f: {only_t:#?}\nonly via netlink: {only_n:#?}"
            );
        }
    }
}

#[test]
fn partial_and_full_syncs_build_the_same_tables_as_the_text_path() {
    let pair = Pair::new();
    let (mut text, mut netlink) = (Applied::default(), Applied::default());
    for (step, desired) in [a(), b(), a(), b()].into_iter().enumerate() {
        let t = text.sync(&pair.text, desired.clone()).unwrap();
        let n = netlink.sync(&pair.netlink, desired).unwrap();
        // `nft` replaces the tables when a new shared dispatch chain appears (see
        // `Nft::rules_on_existing_data_maps`); netlink always patches.
        if !t.full {
            assert_eq!(t, n);
        }
        assert_eq!(n.full, step == 0);
        pair.assert_same(&format!("after sync {step}"));
    }
    // Now a full sync over what the partial ones left: still the same.
    let mut fresh = Applied::default();
    assert!(fresh.sync(&pair.netlink, b()).unwrap().full);
    pair.assert_same("after a full sync over partial ones");
    let text_listing = listing(&pair.text);
    assert!(
        text_listing.contains("numgen random mod 20 map @endpoints"),
        "{text_listing}"
    );
    assert!(
        text_listing.contains("fw-default/lb6/tcp/443"),
        "{text_listing}"
    );
    // Same text too, up to the order in which hash sets list their elements.
    let sorted = |s: String| {
        let mut lines: Vec<String> = s
            .lines()
            .map(|l| l.trim().trim_end_matches(',').to_string())
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(text_listing), sorted(listing(&pair.netlink)));
}

#[test]
fn a_refused_batch_keeps_the_previous_ruleset_and_says_why() {
    let ns = NetNs::create("nlr").unwrap();
    let nft = NftNetlink::in_netns(ns.path()).with_list_program(NFT);
    let mut syncer = Applied::default();
    syncer.sync(&nft, a()).unwrap();
    let before = normalized(&ns);

    // A rule jumping to a chain that does not exist: encodable, refused by the kernel.
    let mut bad = b();
    bad.v4
        .chains
        .get_mut("services")
        .unwrap()
        .rules
        .push(Rule::from(Verdict::jump("no-such-chain")));
    let err = syncer.sync(&nft, bad.clone()).unwrap_err();
    let SyncError::ApplyRuleset { full, source, .. } = &err;
    assert!(!full);
    match source {
        NftError::Rejected { refusals } => {
            assert_eq!(refusals.len(), 1, "{refusals:?}");
            assert!(
                refusals[0].command.contains("jump no-such-chain"),
                "{refusals:?}"
            );
            assert_eq!(refusals[0].errno, libc::ENOENT);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(syncer.0.is_none());
    assert_eq!(
        normalized(&ns),
        before,
        "a refused partial sync changed the tables"
    );

    // The next sync is full; refused as well, it also leaves everything as it was.
    let err = syncer.sync(&nft, bad).unwrap_err();
    assert!(
        matches!(err, SyncError::ApplyRuleset { full: true, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("full"), "{err}");
    let chain = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        chain.contains("no-such-chain") && chain.contains("No such file or directory"),
        "{chain}"
    );
    assert_eq!(
        normalized(&ns),
        before,
        "a refused full sync changed the tables"
    );

    // And a good one goes through in full.
    assert!(syncer.sync(&nft, b()).unwrap().full);
    assert_ne!(normalized(&ns), before);
}

#[test]
fn cleanup_removes_only_the_proxy_tables() {
    let ns = NetNs::create("nlc").unwrap();
    ns.run(NFT, &["add", "table", "ip", "someone-else"])
        .unwrap();
    ns.run(NFT, &["add", "chain", "ip", "someone-else", "keep"])
        .unwrap();
    let nft = NftNetlink::in_netns(ns.path()).with_list_program(NFT);
    // Works on an empty namespace too.
    strake_proxy::cleanup(&nft).unwrap();
    Applied::default().sync(&nft, a()).unwrap();
    strake_proxy::cleanup(&nft).unwrap();
    let out = ns.run(NFT, &["list", "tables"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "table ip someone-else\n"
    );
}

/// Commands name no table but the proxy's own (see `Command`); a transaction that cannot be
/// encoded is refused whole, before anything reaches the kernel.
#[test]
fn a_transaction_that_cannot_be_encoded_sends_nothing() {
    let ns = NetNs::create("nlo").unwrap();
    ns.run(NFT, &["add", "table", "ip", "someone-else"])
        .unwrap();
    let nft = NftNetlink::in_netns(ns.path()).with_list_program(NFT);
    // An IPv6 endpoint in the IPv4 table, after a valid command.
    let rule = Rule::new([Stmt::DnatTo("fd00::1".parse().unwrap(), 80)]);
    let tx = Transaction {
        commands: vec![
            Command::AddTable(IpFamily::V4),
            Command::AddChain {
                family: IpFamily::V4,
                name: "c",
                base: None,
            },
            Command::AddRule {
                family: IpFamily::V4,
                chain: "c",
                rule: &rule,
            },
        ],
    };
    let err = nft.apply(&tx).unwrap_err();
    match &err {
        NftError::Encode { source } => {
            assert_eq!(source.line, 3, "{source}");
            assert!(source.command.contains("dnat to [fd00::1]:80"), "{source}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let out = ns.run(NFT, &["list", "tables"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "table ip someone-else\n"
    );
}

#[test]
fn a_large_full_sync_is_one_transaction_of_many_megabytes() {
    // 6000 Services x 10 endpoints: a script of ~3.4 MB and a batch far above the default
    // socket buffer, whose `service-ips` and `endpoints` element lists span many messages.
    let ns = NetNs::create("nll").unwrap();
    let nft = NftNetlink::in_netns(ns.path()).with_list_program(NFT);
    let n = 6000;
    let svcs: Vec<Service> = (0..n)
        .map(|i| {
            service(
                &format!("s{i}"),
                json!({ "clusterIP": format!("10.96.{}.{}", i / 250, 1 + i % 250), "ports": [{ "port": 80 }] }),
            )
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..n)
        .map(|i| {
            let eps: Vec<(String, &str)> = (0..10)
                .map(|e| {
                    let k = i * 10 + e;
                    (format!("10.244.{}.{}", k / 250, 1 + k % 250), "n1")
                })
                .collect();
            slice(&format!("s{i}"), "IPv4", &eps)
        })
        .collect();
    let report = Applied::default()
        .sync(&nft, build(&svcs, &slices))
        .unwrap();
    assert!(report.full && report.bytes > 3_000_000, "{report:?}");
    let elements = |map: &str| {
        let out = ns
            .run(NFT, &["-j", "list", "map", "ip", TABLE, map])
            .unwrap();
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        value["nftables"][1]["map"]["elem"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(elements("service-ips"), n);
    assert_eq!(elements("endpoints"), n * 10);
}

/// The golden script of every Service kind (`src/nft/testdata/kinds/`, checked against the
/// builder by the unit test `nft::golden::each_kind_of_service_renders_as_its_golden_file`) is
/// one that nft and the kernel take as it is, in a fresh namespace, and gives both tables.
#[test]
fn every_golden_kind_script_is_taken_by_nft_and_the_kernel() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/nft/testdata/kinds");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{} kinds only", files.len());
    for file in files {
        let ns = NetNs::create("nlg").unwrap();
        let out = ns.run(NFT, &["-f", file.to_str().unwrap()]);
        assert!(out.is_ok(), "{}: {out:?}", file.display());
        let tables = ns.run(NFT, &["list", "tables"]).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&tables.stdout),
            "table ip strake-proxy\ntable ip6 strake-proxy\n",
            "{}",
            file.display()
        );
    }
}
