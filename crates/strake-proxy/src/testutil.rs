//! Builders for API objects in unit tests.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use crate::config::Config;
use crate::model::{self, Model};

pub const NODE: &str = "node-a";

pub fn config() -> Config {
    Config {
        node_name: NODE.to_string(),
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:244::/64".parse().expect("cidr"),
        ],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    }
}

pub fn service(ns: &str, name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
    }))
    .expect("valid Service")
}

pub fn with_status(mut svc: Service, status: Value) -> Service {
    svc.status = Some(serde_json::from_value(status).expect("valid status"));
    svc
}

pub fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": ns,
            "name": name,
            "labels": { "kubernetes.io/service-name": svc },
        },
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("valid EndpointSlice")
}

/// An endpoint on `node` with the given readiness.
pub fn ep(ip: &str, node: &str, ready: bool) -> Value {
    json!({ "addresses": [ip], "nodeName": node, "conditions": { "ready": ready, "serving": ready, "terminating": false } })
}

/// A plain ClusterIP Service `ns/name` at `ip:80` (port `http`) with endpoints `ips` on port 8080.
pub fn simple(ns: &str, name: &str, ip: &str, ips: &[&str]) -> (Service, EndpointSlice) {
    let svc = service(
        ns,
        name,
        json!({ "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] }),
    );
    let eps: Vec<Value> = ips.iter().map(|ip| ep(ip, "node-b", true)).collect();
    let slice = slice(
        ns,
        name,
        &format!("{name}-1"),
        "IPv4",
        json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
        json!(eps),
    );
    (svc, slice)
}

pub fn model_of(services: &[Service], slices: &[EndpointSlice]) -> Model {
    let (model, warnings) = model::build(services, slices, None, &config());
    assert!(warnings.is_empty(), "unexpected warnings: {warnings:?}");
    model
}

/// `default/lb`: a LoadBalancer with `externalTrafficPolicy: Local`, health-check node port
/// 30999, NodePort 30081, source ranges `203.0.113.0/24` and ingress `198.51.100.1`; its slice
/// has one endpoint on this node and one on `node-b`.
pub fn local_load_balancer() -> (Service, EndpointSlice) {
    let svc = with_status(
        service(
            "default",
            "lb",
            json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.8", "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["203.0.113.0/24"], "healthCheckNodePort": 30999,
                    "ports": [{ "port": 80, "nodePort": 30081 }] }),
        ),
        json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.1" }] } }),
    );
    let sl = slice(
        "default",
        "lb",
        "lb-1",
        "IPv4",
        json!([{ "port": 80 }]),
        json!([
            ep("10.244.3.1", NODE, true),
            ep("10.244.3.2", "node-b", true)
        ]),
    );
    (svc, sl)
}
