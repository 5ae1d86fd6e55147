//! Golden scripts: what the ruleset builder and the sync code write for the rulesets of
//! [`crate::testutil::corpus`], full and partial, kept in `testdata/golden.nft`. Any change to
//! the text the proxy writes shows up here as a diff to review.
//!
//! The file was written by the text builder that came before the typed objects of
//! [`crate::nft::objects`]; the scripts rendered from those are the same bytes, but for the
//! order of the elements within one `add element`/`delete element` command: typed keys sort
//! as values (`10.96.0.2` before `10.96.0.10`), text keys sorted as text. Neither nft nor the
//! kernel reads anything into that order, so the comparison sorts the elements of each such
//! command (the corpus has fewer than [`crate::nft::transaction::ELEMENT_CHUNK`] per set, one
//! command each).
//!
//! Beside them, one script per Service type and traffic policy alone, in `testdata/kinds/`.
//!
//! `STRAKE_UPDATE_GOLDEN=1 cargo test -p strake-proxy --lib golden` rewrites the files.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

use crate::nft::ruleset::{Rules, Ruleset};
use crate::nft::transaction::{
    Transaction, full_script, full_script_of, full_transaction_of, partial_script,
    partial_transaction,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::Config;
use crate::testutil::{Case, corpus};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/nft/testdata/golden.nft");
const GOLDEN_BATCHES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/nft/testdata/golden-batches.txt"
);

/// The ports of `new` replace those of `old` in `rules`, one by one, as the daemon does.
fn update(rules: &mut Rules, old: &Case, new: &Case) {
    let (old, new) = (old.model(), new.model());
    for (id, port) in &old.services {
        if !new.services.contains_key(id) {
            rules.update(Some(port), None);
        }
    }
    for (id, port) in &new.services {
        let before = old.services.get(id);
        if before != Some(port) {
            rules.update(before, Some(port));
        }
    }
}

/// Every transaction of the corpus, named: the full ones, then the partial ones between states.
fn transactions(mut each: impl FnMut(String, &Transaction<'_>)) {
    let cases = corpus();
    for case in &cases {
        let rules = case.rules();
        each(
            format!("full: {}", case.name),
            &full_transaction_of(&rules.views()),
        );
    }
    for (a, b) in [(0, 1), (1, 2), (2, 1), (1, 0), (0, 2)] {
        let (old, new) = (&cases[a], &cases[b]);
        let applied = Ruleset::build(&old.model(), &old.config);
        let desired = Ruleset::build(&new.model(), &new.config);
        let tx = partial_transaction(&applied, &desired).unwrap();
        each(format!("diff: {} -> {}", old.name, new.name), &tx);
    }
}

/// FNV-1a, 64 bits: a digest that needs no crate.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The netlink batch of every transaction of the corpus: its size and digest.
fn batches() -> String {
    let mut out = String::new();
    transactions(|name, tx| {
        let batch = crate::nft::netlink::encode::encode(tx, 1).unwrap();
        let _ = writeln!(
            out,
            "{name}: {} bytes, {} messages, fnv1a {:016x}",
            batch.bytes.len(),
            batch.commands.len(),
            fnv1a(&batch.bytes)
        );
    });
    out
}

/// The batches the netlink backend sends for the corpus are the golden ones, byte for byte
/// (as digests; the file was written when the typed encoder was proven to give the bytes of
/// the text encoder before it). Integers in native byte order: a little-endian host's.
#[test]
#[cfg(target_endian = "little")]
fn batches_are_the_golden_ones() {
    let now = batches();
    if std::env::var_os("STRAKE_UPDATE_GOLDEN").is_some() {
        std::fs::write(GOLDEN_BATCHES, &now).unwrap();
        return;
    }
    assert_eq!(now, std::fs::read_to_string(GOLDEN_BATCHES).unwrap());
}

/// Every script of the corpus, in one text.
pub(crate) fn scripts() -> String {
    let cases = corpus();
    let mut out = String::new();
    for case in &cases {
        let rules = case.rules();
        let script = full_script_of(&rules.views());
        assert_eq!(script, full_script(&rules.materialize()), "{}", case.name);
        let _ = write!(out, "### full: {}\n{script}", case.name);
    }
    // Partial syncs between the states of one configuration, both ways.
    for (a, b) in [(0, 1), (1, 2), (2, 1), (1, 0), (0, 2)] {
        let (old, new) = (&cases[a], &cases[b]);
        let applied = Ruleset::build(&old.model(), &old.config);
        let desired = Ruleset::build(&new.model(), &new.config);
        let diff = partial_script(&applied, &desired).unwrap();
        let _ = write!(out, "### diff: {} -> {}\n{diff}", old.name, new.name);
        let mut rules = old.rules();
        rules.discard_delta();
        update(&mut rules, old, new);
        let (before, after) = rules.take_delta();
        let delta = partial_script(&before, &after).unwrap();
        let _ = write!(out, "### delta: {} -> {}\n{delta}", old.name, new.name);
    }
    out
}

/// `text` with the elements of each element command sorted.
fn elements_sorted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let is_elements = line.starts_with("add element ") || line.starts_with("delete element ");
        match line.split_once(" { ") {
            Some((head, items)) if is_elements => {
                let items = items.strip_suffix(" }").unwrap();
                let mut items: Vec<&str> = items.split(", ").collect();
                items.sort_unstable();
                let _ = writeln!(out, "{head} {{ {} }}", items.join(", "));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn scripts_are_the_golden_ones() {
    let now = scripts();
    if std::env::var_os("STRAKE_UPDATE_GOLDEN").is_some() {
        std::fs::write(GOLDEN, &now).unwrap();
        return;
    }
    let golden = elements_sorted(&std::fs::read_to_string(GOLDEN).unwrap());
    let now = elements_sorted(&now);
    if now != golden {
        let (n, g): (Vec<&str>, Vec<&str>) = (now.lines().collect(), golden.lines().collect());
        let first = n
            .iter()
            .zip(&g)
            .position(|(a, b)| a != b)
            .unwrap_or(n.len().min(g.len()));
        panic!(
            "scripts differ from {GOLDEN} at line {}:\nnow:    {:?}\ngolden: {:?}",
            first + 1,
            n.get(first),
            g.get(first)
        );
    }
}

/// One Service of each type and traffic policy, alone on the node: (file name, what it shows,
/// the Services, their slices, the proxy's configuration).
fn one_per_kind() -> Vec<(&'static str, Vec<Service>, Vec<EndpointSlice>, Config)> {
    use serde_json::json;

    use crate::testutil::{
        NODE, config, ep, local_load_balancer, service, simple, slice, with_status,
    };
    let two = |name: &str| {
        slice(
            "default",
            name,
            &format!("{name}-1"),
            "IPv4",
            json!([{ "port": 8080 }]),
            json!([
                ep("10.244.1.1", NODE, true),
                ep("10.244.2.1", "node-b", true)
            ]),
        )
    };
    let one = |name: &str, spec: serde_json::Value| {
        (
            vec![service("default", name, spec)],
            vec![two(name)],
            config(),
        )
    };
    let mut out = Vec::new();
    let (svc, sl) = simple("default", "web", "10.96.0.1", &["10.244.1.1", "10.244.2.1"]);
    out.push(("cluster-ip", vec![svc], vec![sl], config()));
    let (svc, sl) = simple("default", "web", "10.96.0.1", &[]);
    out.push((
        "cluster-ip-without-endpoints",
        vec![svc],
        vec![sl],
        config(),
    ));
    let (svcs, sls, cfg) = one(
        "sticky",
        json!({ "clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } },
                "ports": [{ "port": 80 }] }),
    );
    out.push(("cluster-ip-session-affinity", svcs, sls, cfg));
    let (svcs, sls, cfg) = one(
        "itp",
        json!({ "clusterIP": "10.96.0.3", "internalTrafficPolicy": "Local", "ports": [{ "port": 80 }] }),
    );
    out.push(("cluster-ip-internal-traffic-local", svcs, sls, cfg));
    let (svcs, sls, cfg) = one(
        "ext",
        json!({ "clusterIP": "10.96.0.4", "externalIPs": ["192.0.2.4"], "ports": [{ "port": 80 }] }),
    );
    out.push(("cluster-ip-external-ips", svcs, sls, cfg));
    let (svcs, sls, cfg) = one(
        "np",
        json!({ "type": "NodePort", "clusterIP": "10.96.0.5", "ports": [{ "port": 80, "nodePort": 30005 }] }),
    );
    out.push(("node-port", svcs, sls, cfg));
    let (svcs, sls, cfg) = one(
        "np-local",
        json!({ "type": "NodePort", "clusterIP": "10.96.0.6", "externalTrafficPolicy": "Local",
                "ports": [{ "port": 80, "nodePort": 30006 }] }),
    );
    out.push(("node-port-external-traffic-local", svcs, sls, cfg));
    let lb = with_status(
        service(
            "default",
            "lb",
            json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.7",
                    "ports": [{ "port": 80, "nodePort": 30007 }] }),
        ),
        json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.7" }] } }),
    );
    out.push(("load-balancer", vec![lb], vec![two("lb")], config()));
    let (svc, sl) = local_load_balancer();
    out.push((
        "load-balancer-external-traffic-local-source-ranges",
        vec![svc],
        vec![sl],
        config(),
    ));
    let dual = with_status(
        service(
            "default",
            "dual",
            json!({ "type": "LoadBalancer", "clusterIPs": ["10.96.0.9", "fd00:96::9"],
                    "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                    "ports": [{ "port": 80, "nodePort": 30009 }] }),
        ),
        json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.9" }, { "ip": "2001:db8::9" }] } }),
    );
    let dual6 = slice(
        "default",
        "dual",
        "dual-2",
        "IPv6",
        json!([{ "port": 8080 }]),
        json!([ep("fd00:244::1", NODE, true)]),
    );
    out.push((
        "load-balancer-dual-stack",
        vec![dual],
        vec![two("dual"), dual6],
        config(),
    ));
    let (svcs, sls, _) = one(
        "udp",
        json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 53, "protocol": "UDP" }] }),
    );
    let udp_slice = slice(
        "default",
        "udp",
        "udp-1",
        "IPv4",
        json!([{ "port": 53, "protocol": "UDP" }]),
        json!([ep("10.244.1.1", NODE, true)]),
    );
    drop(sls);
    out.push(("cluster-ip-udp", svcs, vec![udp_slice], config()));
    let (svcs, _, _) = one(
        "headless",
        json!({ "clusterIP": "None", "ports": [{ "port": 80 }] }),
    );
    out.push(("headless", svcs, vec![two("headless")], config()));
    let (svcs, _, _) = one(
        "name",
        json!({ "type": "ExternalName", "externalName": "example.com" }),
    );
    out.push(("external-name", svcs, vec![], config()));
    let (svcs, sls, mut cfg) = one(
        "np",
        json!({ "type": "NodePort", "clusterIP": "10.96.0.5", "ports": [{ "port": 80, "nodePort": 30005 }] }),
    );
    cfg.masquerade_all = true;
    cfg.nodeport_addresses =
        crate::config::NodePortAddresses::parse(&["192.0.2.0/24".to_string()]).unwrap();
    out.push((
        "node-port-masquerade-all-nodeport-addresses",
        svcs,
        sls,
        cfg,
    ));
    out
}

/// Where the golden script of one Service kind is.
fn kind_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/nft/testdata/kinds")
        .join(format!("{name}.nft"))
}

/// The full script of each Service type and traffic policy alone is its golden file
/// (`testdata/kinds/<kind>.nft`), so a change to what one kind of Service becomes reads as a
/// diff of that kind's file.
#[test]
fn each_kind_of_service_renders_as_its_golden_file() {
    let update = std::env::var_os("STRAKE_UPDATE_GOLDEN").is_some();
    let kinds = one_per_kind();
    let mut seen = std::collections::BTreeSet::new();
    for (name, services, slices, config) in &kinds {
        assert!(seen.insert(*name), "{name} twice");
        let (model, warnings) = crate::model::build(services, slices, None, config);
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        let script = full_script(&Ruleset::build(&model, config));
        let path = kind_file(name);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &script).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (STRAKE_UPDATE_GOLDEN=1 writes it)", path.display())
        });
        assert_eq!(
            elements_sorted(&script),
            elements_sorted(&golden),
            "{name} differs from {}",
            path.display()
        );
    }
    // No golden file without its kind.
    let dir = kind_file("x").parent().unwrap().to_path_buf();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let kind = file.strip_suffix(".nft").unwrap_or(&file).to_string();
        assert!(
            seen.contains(kind.as_str()),
            "{file} has no kind in one_per_kind()"
        );
    }
}
