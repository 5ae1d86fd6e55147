//! The CPU cost of one sync in the daemon, without `nft`: API objects -> `model::build` ->
//! `Ruleset::build` -> the sync's transaction (and the plan as nft text), for N Services x M endpoints, as a full sync and as a
//! partial one after a single endpoint change. No root needed.
//!
//! `cargo run --release -p strake-proxy --example sync_cost -- [SERVICES] [ENDPOINTS]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use strake_proxy::config::Config;
use strake_proxy::model;
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::transaction::{full_transaction, partial_transaction};

fn objects(services: u32, endpoints: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..services {
        let ip = format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250);
        svcs.push(
            serde_json::from_value(json!({
                "metadata": { "namespace": "default", "name": format!("svc-{i}") },
                "spec": { "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80 }] },
            }))
            .unwrap(),
        );
        let eps: Vec<_> = (0..endpoints)
            .map(|e| {
                let n = i * endpoints + e;
                json!({ "addresses": [format!("10.{}.{}.{}", 128 + n / 62_500, (n / 250) % 250, 1 + n % 250)], "nodeName": "n1" })
            })
            .collect();
        slices.push(
            serde_json::from_value(json!({
                "metadata": { "namespace": "default", "name": format!("svc-{i}-1"), "labels": { "kubernetes.io/service-name": format!("svc-{i}") } },
                "addressType": "IPv4",
                "ports": [{ "name": "http", "port": 8080 }],
                "endpoints": eps,
            }))
            .unwrap(),
        );
    }
    (svcs, slices)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let endpoints: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let config = Config {
        node_name: "n1".into(),
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    };
    let (svcs, mut slices) = objects(services, endpoints);
    let step = |svcs: &[Service], slices: &[EndpointSlice], applied: Option<&Ruleset>| {
        let t = Instant::now();
        let (m, w) = model::build(svcs, slices, None, &config);
        assert!(w.is_empty(), "{:?}", &w[..w.len().min(3)]);
        let t_model = t.elapsed();
        let r = Ruleset::build(&m, &config);
        let t_rules = t.elapsed() - t_model;
        let (tx, full) = match applied.and_then(|a| partial_transaction(a, &r)) {
            Some(tx) => (tx, false),
            None => (full_transaction(&r), true),
        };
        let t_plan = t.elapsed() - t_model - t_rules;
        let script = tx.to_string();
        let t_text = t.elapsed() - t_model - t_rules - t_plan;
        println!(
            "{} sync: model {:?}, ruleset {:?}, plan {:?} ({} commands), as text {:?} ({} bytes); total {:?}",
            if full { "full" } else { "partial" },
            t_model,
            t_rules,
            t_plan,
            tx.commands.len(),
            t_text,
            script.len(),
            t.elapsed()
        );
        drop(tx);
        r
    };
    println!("{services} Services x {endpoints} endpoints");
    // The first sync is full; pretend it was applied, then change one endpoint of one Service.
    let first = step(&svcs, &slices, None);
    let last = slices.last_mut().unwrap();
    last.endpoints.as_mut().unwrap()[0].addresses[0] = "10.255.255.1".into();
    step(&svcs, &slices, Some(&first));
}
